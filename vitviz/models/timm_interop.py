"""timm <-> vitviz: weights both ways, and ``timm:<name>`` models with pretrained weights.

Our module names equal timm's, so a conversion is: read the architecture off the timm model, check it
is one we implement (refusing by name what we do not: other block types, distillation tokens, qk-norm,
CLIP's pre-norm ...), build ours and load the very same state dict with ``strict=True``. One layout
differs: timm's ``no_embed_class`` (DeiT-III, DINOv2) gives the prefix tokens no position entry, ours
always has one (explanations read the grid after it); a zero entry there is the same model.

``create_timm_model`` returns our model when the architecture converts and timm's own otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from vitviz.config import HybridConfig, ResNetConfig, ViTConfig
from vitviz.errors import ConfigError

_AS_IS = "use the timm model as it is (vitviz.create_model('timm:<name>') returns it when it does not convert)"


def from_timm(model: nn.Module) -> nn.Module:
    """Our own model class carrying a timm model's weights (ViT, hybrid ViT or ResNet).

    The returned model is in the same train/eval mode as ``model`` and produces the same logits.
    ConfigError, naming the feature, for anything our classes cannot represent.
    """
    ours = _build_ours(model)
    _copy_weights(model, ours)
    return ours.train(model.training)


def timm_config(model: nn.Module) -> tuple[str, ViTConfig | ResNetConfig | HybridConfig]:
    """(family, config) of our equivalent of a timm model; ConfigError for what we do not implement."""
    from timm.models.resnet import ResNet as TimmResNet
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if isinstance(model, TimmViT):
        vit = _vit_config(model)
        if getattr(model.patch_embed, "backbone", None) is None:
            return "vit", vit
        cfg = getattr(model, "pretrained_cfg", None)
        arch = cfg.get("architecture") if isinstance(cfg, dict) else None
        if not arch:
            raise ConfigError(
                "this timm hybrid has no pretrained_cfg['architecture'] to rebuild its backbone from; create it "
                "with timm.create_model."
            )
        return "hybrid", HybridConfig(vit=vit, backbone=f"timm:{arch}")
    if isinstance(model, TimmResNet):
        return "resnet", _resnet_config(model)
    raise ConfigError(
        f"vitviz converts timm's VisionTransformer (plain, hybrid, with registers or layer scale) and ResNet "
        f"models, not {type(model).__name__}; {_AS_IS}."
    )


def to_timm(model: nn.Module) -> nn.Module:
    """A timm model carrying our model's weights (same logits); ConfigError where timm has no equivalent."""
    import timm

    family = model.family
    if family == "resnet":
        c = model.config
        if c.stem != "imagenet" or c.width != 64 or len(c.layers) != 4:
            raise ConfigError("timm's ResNet has no small-image stem or custom width/stage count; cannot convert.")
        from timm.models.resnet import BasicBlock, Bottleneck
        from timm.models.resnet import ResNet as TimmResNet

        block = BasicBlock if c.block == "basic" else Bottleneck
        target = TimmResNet(block=block, layers=list(c.layers), num_classes=c.num_classes, in_chans=c.in_chans)
    elif family == "vit":
        c = model.config
        # positions with a class-token entry (no_embed_class=False): ours always have one per prefix token
        target = timm.models.vision_transformer.VisionTransformer(
            img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, num_classes=c.num_classes,
            global_pool="avg" if c.pooling == "mean" else "token", **_timm_vit_kwargs(c),
        )
    elif family == "hybrid" and model.config.backbone.startswith("timm:vit_"):
        c = model.config.vit
        target = timm.create_model(
            model.config.backbone.removeprefix("timm:"), pretrained=False, img_size=c.img_size,
            **{**model.config.timm_kwargs, **dict(
                num_classes=c.num_classes, global_pool="avg" if c.pooling == "mean" else "token",
                **_timm_vit_kwargs(c))},
        )
    else:
        raise ConfigError("only hybrids built from a timm hybrid ViT have a timm equivalent; this one has none.")
    target.load_state_dict(model.state_dict(), strict=True)
    return target.train(model.training)


def to_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict under timm's names (they are the same names; this checks it by building timm's model)."""
    return to_timm(model).state_dict()


def create_timm_model(name: str, *, pretrained: bool = False, pretrained_file: str | os.PathLike | None = None,
                      convert: bool | None = None, progress: Callable[[str], None] | None = None,
                      **kwargs: Any) -> nn.Module:
    """``timm:<name>`` in eval mode: our own model when it converts, otherwise timm's model itself, unchanged.

    ``convert``: None converts when :func:`from_timm` can, True requires it (ConfigError naming what does
    not convert), False never converts. ``kwargs`` go to ``timm.create_model``.

    The architecture is checked before any weights are looked for, so an unknown name, a bad argument or
    an impossible ``convert=True`` fail at once, offline or not. Weights (``pretrained`` or
    ``pretrained_file``) then come from the file (safetensors only), the local Hugging Face cache, or a
    download when the Hub can be reached, ``progress`` hearing a short message before it starts (see
    :mod:`vitviz.models.pretrained`); else WeightsUnavailableError, carrying ``model_name`` and ``hub_id``.
    """
    from vitviz.models.pretrained import load_pretrained, pretrained_cfg

    pretrained_cfg(name)  # an unknown name or tag is a ConfigError before anything is built or fetched
    tm = _build_timm(name, kwargs)
    ours = _conversion(tm, name, convert)
    if pretrained or pretrained_file is not None:
        tm = load_pretrained(tm, name, pretrained_file=pretrained_file, progress=progress, **kwargs)
    tm.eval()
    if ours is None:
        return tm
    _copy_weights(tm, ours)
    return ours.eval()


def timm_preprocessing(name: str) -> dict[str, Any]:
    """mean, std and input size a timm model was trained with (from its pretrained config)."""
    from vitviz.models.pretrained import pretrained_cfg

    cfg = pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    from vitviz.images import IMAGENET_MEAN, IMAGENET_STD

    return {"mean": tuple(cfg.get("mean", IMAGENET_MEAN)), "std": tuple(cfg.get("std", IMAGENET_STD)),
            "img_size": int(cfg.get("input_size", (3, 224, 224))[-1])}


# --- building and filling ours -------------------------------------------------------------------

def _build_ours(model: nn.Module) -> nn.Module:
    from vitviz.models.registry import build_model

    family, config = timm_config(model)
    ours = build_model(family, config)
    _check_fits(model, ours, _timm_state(model, ours))
    return ours


def _copy_weights(model: nn.Module, ours: nn.Module) -> None:
    state = _timm_state(model, ours)
    _check_fits(model, ours, state)
    ours.load_state_dict(state, strict=True)


def _timm_state(model: nn.Module, ours: nn.Module) -> dict[str, torch.Tensor]:
    """timm's state dict in our layout: no_embed_class positions get zero entries for the prefix tokens."""
    state = dict(model.state_dict())
    pos = state.get("pos_embed")
    if getattr(model, "no_embed_class", False) and pos is not None:
        prefix = int(ours.num_prefix_tokens)
        state["pos_embed"] = torch.cat([pos.new_zeros(pos.shape[0], prefix, pos.shape[2]), pos], dim=1)  # (1, P+N, D)
    return state


def _check_fits(model: nn.Module, ours: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = ours.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"timm model {type(model).__name__} does not map onto our {ours.family}: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, other shapes {shapes[:4]}; {_AS_IS}."
        )


def _build_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as err:  # timm's ways to refuse arguments
        raise ConfigError(f"timm cannot build {name!r} with {kwargs}: {err}") from err


def _conversion(model: nn.Module, name: str, convert: bool | None) -> nn.Module | None:
    """Our (empty) model for ``model``, or None where timm's is to be used as it is."""
    if convert is False:
        return None
    try:
        return _build_ours(model)
    except ConfigError as err:
        if convert:
            raise ConfigError(
                f"timm:{name} does not convert to a vitviz model: {err} Pass convert=None (or False) to get "
                "timm's model as it is."
            ) from err
        return None


def _timm_vit_kwargs(c: ViTConfig) -> dict[str, Any]:
    kw: dict[str, Any] = dict(embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                              qkv_bias=c.qkv_bias, reg_tokens=c.reg_tokens, init_values=c.init_values)
    if c.norm_eps != 1e-6:  # timm's ViT default
        kw["norm_layer"] = partial(nn.LayerNorm, eps=c.norm_eps)
    return kw


# --- reading a timm ViT --------------------------------------------------------------------------

_BLOCK_KINDS = {
    "ResPostBlock": "residual post-norm blocks (ResPostBlock)",
    "ParallelThingsBlock": "parallel attention and MLP branches (ParallelThingsBlock)",
    "ParallelScalingBlock": "parallel attention and MLP with fused projections (ParallelScalingBlock)",
    "DiffParallelScalingBlock": "parallel differential-attention blocks (DiffParallelScalingBlock)",
}


def _vit_config(m: nn.Module) -> ViTConfig:
    problems = _unique(_vit_model_problems(m) + _patch_embed_problems(m) + _blocks_problems(m))
    if problems:
        raise ConfigError(
            f"this timm ViT has {', '.join(problems)}, which vitviz's ViT does not implement; {_AS_IS}."
        )
    pe, blk = m.patch_embed, m.blocks[0]
    embed_dim = blk.norm1.normalized_shape[0]
    pos_drop = getattr(m, "pos_drop", None)
    return ViTConfig(
        img_size=_side(pe.img_size), patch_size=pe.proj.kernel_size[0] if _is_hybrid(m) else _side(pe.patch_size),
        in_chans=int(getattr(pe, "in_chans", None) or pe.proj.in_channels), num_classes=_num_classes(m.head),
        embed_dim=embed_dim, depth=len(m.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        pooling="mean" if m.global_pool == "avg" else "token",
        dropout=float(pos_drop.p) if isinstance(pos_drop, nn.Dropout) else 0.0,
        attn_dropout=float(blk.attn.attn_drop.p), norm_eps=float(blk.norm1.eps),
        reg_tokens=int(getattr(m, "num_reg_tokens", 0) or 0), init_values=_layer_scale_init(blk.ls1),
    )


def _vit_model_problems(m: nn.Module) -> list[str]:
    """Features of the model around its blocks: tokens, positions, pooling, norms, head."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    out = []
    distilled = getattr(m, "dist_token", None) is not None
    if distilled:
        out.append("a distillation token and head (distilled DeiT)")
    elif type(m) is not TimmViT:
        out.append(f"the VisionTransformer subclass {type(m).__name__}")
    regs = int(getattr(m, "num_reg_tokens", 0) or 0)
    if not getattr(m, "has_class_token", False) or getattr(m, "cls_token", None) is None:
        out.append("no class token")
    elif not distilled and getattr(m, "num_prefix_tokens", None) != 1 + regs:
        out.append(f"{getattr(m, 'num_prefix_tokens', '?')} prefix tokens that are neither class nor register tokens")
    if regs and getattr(getattr(m, "reg_token", None), "shape", (0, 0))[:2] != (1, regs):
        out.append("register tokens stored in an unknown layout")
    if not isinstance(getattr(m, "pos_embed", None), torch.Tensor):
        out.append("no learned position embedding")
    pool = getattr(m, "global_pool", None)
    if pool not in ("token", "avg") or getattr(m, "attn_pool", None) is not None:
        out.append(f"global_pool={pool!r}")
    norm, fc_norm = getattr(m, "norm", None), getattr(m, "fc_norm", None)
    if pool == "avg":
        if getattr(m, "pool_include_prefix", False):
            out.append("average pooling over the prefix tokens too (pool_include_prefix)")
        if not (isinstance(norm, nn.Identity) and _is_layer_norm(fc_norm)):
            out.append("average pooling without fc_norm")
    if pool == "token":
        if not isinstance(fc_norm, nn.Identity):
            out.append("token pooling with fc_norm")
        if not _is_layer_norm(norm):
            out.append("no final LayerNorm" if isinstance(norm, nn.Identity) else f"a final {type(norm).__name__}")
    if not isinstance(getattr(m, "norm_pre", nn.Identity()), nn.Identity):
        out.append("a norm before the encoder (pre_norm, as in CLIP)")
    if not isinstance(getattr(m, "patch_drop", nn.Identity()), nn.Identity):
        out.append("patch dropout")
    head = getattr(m, "head", None)
    if not (isinstance(head, nn.Identity) or (type(head) is nn.Linear and head.bias is not None)):
        out.append(f"a {type(head).__name__} head")
    return out


def _patch_embed_problems(m: nn.Module) -> list[str]:
    from timm.layers import PatchEmbed as TimmPatchEmbed

    pe = getattr(m, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, nn.Conv2d) or not (_is_hybrid(m) or isinstance(pe, TimmPatchEmbed)):
        return [f"a {type(pe).__name__} patch embedding"]
    out = []
    k = proj.kernel_size
    if k != proj.stride or k[0] != k[1] or proj.padding != (0, 0) or proj.dilation != (1, 1) or proj.groups != 1:
        out.append("overlapping or non-square patches")
    if proj.bias is None:
        out.append("a patch projection without bias")
    if not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity):
        out.append("a norm in the patch embedding")
    if getattr(pe, "dynamic_img_pad", False):
        out.append("padding of inputs to whole patches (dynamic_img_pad)")
    if _side(getattr(pe, "img_size", None)) is None:
        out.append(f"a non-square or unset input size {getattr(pe, 'img_size', None)}")
    if not _is_hybrid(m) and _side(getattr(pe, "patch_size", None)) != k[0]:
        out.append("a patch size other than its projection's kernel")
    # dynamic_img_size is fine: ours resamples positions for any input size the same way (bicubic, antialiased)
    return out


def _blocks_problems(m: nn.Module) -> list[str]:
    from timm.models.vision_transformer import Block as TimmBlock

    blocks = list(getattr(m, "blocks", None) or [])
    if not blocks:
        return ["no transformer blocks"]
    kinds = sorted({type(b).__name__ for b in blocks if type(b) is not TimmBlock})
    if kinds:
        return [_BLOCK_KINDS.get(k, f"{k} blocks") for k in kinds]
    dim = _width(blocks[0])
    out = []
    for b in blocks:
        out += _attention_problems(b.attn, dim) + _mlp_problems(b.mlp, dim)
        out += [f"a {type(n).__name__} in its blocks" for n in (b.norm1, b.norm2) if not _is_layer_norm(n)]
        out += [f"a {type(s).__name__} on a residual branch" for s in (b.ls1, b.ls2) if not _is_layer_scale_slot(s)]
    if out:
        return out
    if len({isinstance(s, nn.Identity) for b in blocks for s in (b.ls1, b.ls2)}) > 1:
        out.append("layer scale on some residual branches only")
    shapes = {(_width(b), b.attn.num_heads, b.mlp.fc1.out_features, b.attn.qkv.bias is not None) for b in blocks}
    if len(shapes) > 1:
        out.append("blocks of different widths, head counts or MLP sizes")
    norms = [n for b in blocks for n in (b.norm1, b.norm2)] + [getattr(m, "norm", None), getattr(m, "fc_norm", None)]
    if len({n.eps for n in norms if _is_layer_norm(n)}) > 1:
        out.append("LayerNorms with different eps")
    return out


def _attention_problems(attn: nn.Module, dim: int) -> list[str]:
    from timm.layers import Attention as TimmAttention

    if type(attn) is not TimmAttention:
        return [f"{type(attn).__name__} attention"]
    out = []
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        out.append("qk-norm")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        out.append("a norm on the attention output (scale_attn_norm)")
    if getattr(attn, "gate", None) is not None:
        out.append("gated attention")
    if attn.num_heads * attn.head_dim != dim or attn.qkv.out_features != 3 * dim or attn.proj.out_features != dim:
        out.append("attention heads whose widths do not add up to embed_dim")
    if attn.proj.bias is None:
        out.append("no bias on the attention output (proj_bias=False)")
    return out


def _mlp_problems(mlp: nn.Module, dim: int) -> list[str]:
    from timm.layers import Mlp as TimmMlp
    from timm.layers.activations import GELU as TimmGELU

    if type(mlp) is not TimmMlp:
        return [f"a {type(mlp).__name__} MLP (vitviz's is Linear-GELU-Linear)"]
    out = []
    act = mlp.act
    if not ((type(act) is nn.GELU and act.approximate == "none") or type(act) is TimmGELU):
        out.append(f"the {type(act).__name__} activation (vitviz's MLP uses exact GELU)")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        out.append("a norm inside the MLP (scale_mlp_norm)")
    fc1, fc2 = mlp.fc1, mlp.fc2
    if not (type(fc1) is nn.Linear and type(fc2) is nn.Linear and fc1.in_features == dim and fc2.out_features == dim):
        out.append("an MLP that is not Linear in, Linear out")
    elif fc1.bias is None or fc2.bias is None:
        out.append("an MLP without biases")
    return out


def _is_hybrid(m: nn.Module) -> bool:
    return getattr(getattr(m, "patch_embed", None), "backbone", None) is not None


def _is_layer_norm(n: Any) -> bool:
    """A LayerNorm over the last dimension with weight and bias: what ours are."""
    return (isinstance(n, nn.LayerNorm) and len(n.normalized_shape) == 1 and n.elementwise_affine
            and n.bias is not None)


def _is_layer_scale_slot(s: nn.Module) -> bool:
    from timm.layers import LayerScale as TimmLayerScale

    return isinstance(s, nn.Identity) or (type(s) is TimmLayerScale and s.gamma.ndim == 1)


def _layer_scale_init(s: nn.Module) -> float | None:
    if isinstance(s, nn.Identity):
        return None
    value = getattr(s, "init_values", None)
    # only a fresh model's starting gain: the weights carry gamma itself
    return float(value) if isinstance(value, (int, float)) and value > 0 else 1e-5


def _width(block: nn.Module) -> int:
    return int(block.norm1.normalized_shape[0]) if _is_layer_norm(block.norm1) else int(block.attn.qkv.in_features)


def _side(size: Any) -> int | None:
    """The side of a square size given as an int or a pair; None when not square or not given."""
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    return None


def _num_classes(head: nn.Module) -> int:
    return head.out_features if isinstance(head, nn.Linear) else 0


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- reading a timm ResNet -----------------------------------------------------------------------

def _resnet_config(m: nn.Module) -> ResNetConfig:
    problems = _unique(_resnet_problems(m))
    if problems:
        raise ConfigError(
            f"this timm ResNet has {', '.join(problems)}, which vitviz's ResNet does not implement; {_AS_IS}."
        )
    first = m.layer1[0]
    cfg = getattr(m, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return ResNetConfig(
        layers=tuple(len(getattr(m, f"layer{i}")) for i in range(1, 5)),
        block="bottleneck" if _block_kind(first) == "Bottleneck" else "basic", stem="imagenet",
        width=m.conv1.out_channels, in_chans=m.conv1.in_channels, num_classes=_num_classes(m.fc),
        img_size=int(size[-1]) if isinstance(size, (tuple, list)) and size else 224,
        dropout=float(getattr(m, "drop_rate", 0.0) or 0.0),
    )


def _resnet_problems(m: nn.Module) -> list[str]:
    from timm.models.resnet import ResNet as TimmResNet

    out = [] if type(m) is TimmResNet else [f"the ResNet subclass {type(m).__name__}"]
    conv1 = getattr(m, "conv1", None)
    if not _is_conv(conv1, 7, 2, 3):
        return out + ["a deep or non-standard stem (resnet*c / *d / *s variants)"]
    out += _bn_act_problems(getattr(m, "bn1", None), getattr(m, "act1", None))
    pool = getattr(m, "maxpool", None)
    if not (type(pool) is nn.MaxPool2d and _pair(pool.kernel_size) == (3, 3) and _pair(pool.stride) == (2, 2)
            and _pair(pool.padding) == (1, 1) and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode):
        out.append("an anti-aliased or convolutional stem pool (resnetaa*, resnetblur*)")
    stages = [getattr(m, f"layer{i}", None) for i in range(1, 5)]
    if any(not isinstance(s, nn.Sequential) or len(s) == 0 for s in stages):
        return out + ["stages we cannot read"]
    kinds = {_block_kind(b) for s in stages for b in s}
    if None in kinds or len(kinds) > 1:
        names = sorted({type(b).__name__ for s in stages for b in s})
        return out + [f"{'/'.join(names)} blocks (vitviz's are all BasicBlock or all Bottleneck)"]
    width = conv1.out_channels
    for i, stage in enumerate(stages):
        for j, block in enumerate(stage):
            out += _resnet_block_problems(block, width * 2**i, 2 if i > 0 and j == 0 else 1)
    gp = getattr(m, "global_pool", None)
    if getattr(gp, "pool_type", None) != "avg" or not getattr(gp, "flatten", True):
        out.append(f"global pooling {getattr(gp, 'pool_type', type(gp).__name__)!r}")
    fc = getattr(m, "fc", None)
    if not (isinstance(fc, nn.Identity) or (type(fc) is nn.Linear and fc.bias is not None)):
        out.append(f"a {type(fc).__name__} classifier")
    return out


def _resnet_block_problems(block: nn.Module, planes: int, stride: int) -> list[str]:
    """What differs from our block of ``planes`` channels (x4 out for bottlenecks) and this stride."""
    out = []
    if getattr(block, "se", None) is not None:
        out.append("squeeze-excitation or attention in blocks")
    if not isinstance(getattr(block, "aa", nn.Identity()), nn.Identity):
        out.append("anti-aliased downsampling (blur pool)")
    if not isinstance(getattr(block, "drop_block", nn.Identity()), nn.Identity):
        out.append("DropBlock")
    bottleneck = _block_kind(block) == "Bottleneck"
    convs = [(block.conv1, 1, 1, 0), (block.conv2, 3, stride, 1), (block.conv3, 1, 1, 0)] if bottleneck else \
        [(block.conv1, 3, stride, 1), (block.conv2, 3, 1, 1)]
    if not out and any(not _is_conv(c, k, s, p) for c, k, s, p in convs):  # anti-aliasing moves strides
        out.append("grouped, dilated or differently strided convolutions (ResNeXt, output_stride < 32)")
    outs = [planes, planes, planes * 4] if bottleneck else [planes, planes]
    if [getattr(c, "out_channels", None) for c, *_ in convs] != outs:
        out.append("stage widths other than width * 2**stage (wide ResNets, custom channels)")
    bns = [block.bn1, block.bn2] + ([block.bn3] if bottleneck else [])
    acts = [block.act1, block.act2] + ([block.act3] if bottleneck else [])
    for bn, act in zip(bns, acts, strict=True):
        out += _bn_act_problems(bn, act)
    ds = getattr(block, "downsample", None)
    if ds is not None:
        if isinstance(ds, nn.Sequential) and len(ds) == 2 and _is_conv(ds[0], 1, stride, 0):
            out += _norm_problems(ds[1])
        else:
            out.append("average-pool or wide-kernel shortcuts (resnet*d)")
    return out


def _bn_act_problems(bn: Any, act: Any) -> list[str]:
    out = _norm_problems(bn)
    if type(act) is not nn.ReLU:
        out.append(f"the {type(act).__name__} activation (vitviz's ResNet uses ReLU)")
    return out


def _norm_problems(bn: Any) -> list[str]:
    if type(bn) is not nn.BatchNorm2d:
        return [f"{type(bn).__name__} normalisation"]
    if not _is_plain_bn(bn):
        return ["BatchNorm with eps other than 1e-5 or without affine/running statistics"]
    return []


def _is_plain_bn(bn: Any) -> bool:
    """A BatchNorm2d as ours are (eps matters to eval-mode logits)."""
    return type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.eps == 1e-5


def _block_kind(block: nn.Module) -> str | None:
    from timm.models.resnet import BasicBlock, Bottleneck

    return {BasicBlock: "BasicBlock", Bottleneck: "Bottleneck"}.get(type(block))


def _is_conv(conv: Any, kernel: int, stride: int, padding: int) -> bool:
    """A plain, ungrouped, undilated, bias-free Conv2d of this square kernel, stride and padding."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (kernel, kernel) and conv.stride == (stride, stride)
            and conv.padding == (padding, padding) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is None and conv.padding_mode == "zeros")


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
