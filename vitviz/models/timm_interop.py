"""timm <-> vitviz: weights both ways, and ``timm:<name>`` models with pretrained weights.

Our module names equal timm's, so a conversion is: read the architecture off the timm model, check it
is one we implement (refusing clearly what we do not: register tokens, layer scale, qk-norm ...),
build ours and load the very same state dict with ``strict=True``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitviz.config import HybridConfig, ResNetConfig, ViTConfig
from vitviz.errors import ConfigError, WeightsUnavailableError

_HUB_HOST = "huggingface.co"


def from_timm(model: nn.Module) -> nn.Module:
    """Our own model class carrying a timm model's weights (ViT, hybrid ViT or ResNet).

    The returned model is in the same train/eval mode as ``model`` and produces the same logits.
    """
    from vitviz.models.registry import build_model

    family, config = timm_config(model)
    ours = build_model(family, config)
    missing, unexpected = ours.load_state_dict(_float_state(model), strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"timm model {type(model).__name__} does not map onto our {family}: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}."
        )
    return ours.train(model.training)


def timm_config(model: nn.Module) -> tuple[str, ViTConfig | ResNetConfig | HybridConfig]:
    """(family, config) of our equivalent of a timm model; ConfigError for what we do not implement."""
    from timm.models.resnet import ResNet as TimmResNet
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if isinstance(model, TimmViT):
        vit = _vit_config(model)
        backbone = getattr(model.patch_embed, "backbone", None)
        if backbone is None:
            return "vit", vit
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if not arch:
            raise ConfigError(
                "this timm hybrid has no pretrained_cfg['architecture']; create it with timm.create_model."
            )
        return "hybrid", HybridConfig(vit=vit, backbone=f"timm:{arch}")
    if isinstance(model, TimmResNet):
        return "resnet", _resnet_config(model)
    raise ConfigError(
        f"vitviz converts timm VisionTransformer (incl. hybrids) and ResNet models, not {type(model).__name__}."
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
        target = timm.models.vision_transformer.VisionTransformer(
            img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, num_classes=c.num_classes,
            embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
            qkv_bias=c.qkv_bias, global_pool="avg" if c.pooling == "mean" else "token",
        )
    elif family == "hybrid" and model.config.backbone.startswith("timm:vit_"):
        c = model.config.vit
        target = timm.create_model(
            model.config.backbone.removeprefix("timm:"), pretrained=False, img_size=c.img_size,
            **{**model.config.timm_kwargs, **dict(
                num_classes=c.num_classes, global_pool="avg" if c.pooling == "mean" else "token",
                embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                qkv_bias=c.qkv_bias)},
        )
    else:
        raise ConfigError("only hybrids built from a timm hybrid ViT have a timm equivalent; this one has none.")
    target.load_state_dict(model.state_dict(), strict=True)
    return target.train(model.training)


def to_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict under timm's names (they are the same names; this checks it by building timm's model)."""
    return to_timm(model).state_dict()


def create_timm_model(name: str, *, pretrained: bool = False, pretrained_file: str | os.PathLike | None = None,
                      **kwargs: Any) -> nn.Module:
    """Our model for ``timm:<name>``: timm builds it (with weights when asked), we convert it.

    Weights come from ``pretrained_file`` (safetensors) when given, else from the local Hugging Face
    cache, else from the Hub when it can be reached. Offline with none of these: WeightsUnavailableError.
    """
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r}; see timm.list_models('vit_*') for names.")
    if pretrained_file is not None:
        tm = timm.create_model(name, pretrained=False, **kwargs)
        _load_file(tm, Path(pretrained_file))
    elif pretrained:
        tm = _create_pretrained(name, **kwargs)
    else:
        tm = timm.create_model(name, pretrained=False, **kwargs)
    return from_timm(tm.eval())


def timm_preprocessing(name: str) -> dict[str, Any]:
    """mean, std and input size a timm model was trained with (from its pretrained config)."""
    import timm

    cfg = timm.get_pretrained_cfg(name.split(".")[0] if not timm.get_pretrained_cfg(name) else name)
    cfg = cfg.to_dict() if cfg is not None else {}
    return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            "img_size": int(cfg.get("input_size", (3, 224, 224))[-1])}


# --- helpers -------------------------------------------------------------------------------------

def _vit_config(m: nn.Module) -> ViTConfig:
    from timm.layers import Mlp as TimmMlp

    refuse = []
    if not m.has_class_token or m.cls_token is None:
        refuse.append("no class token")
    if getattr(m, "num_reg_tokens", 0):
        refuse.append("register tokens")
    if m.pos_embed is None or getattr(m, "no_embed_class", False):
        refuse.append("position embeddings without a class-token entry")
    if getattr(m, "dynamic_img_size", False):
        refuse.append("dynamic image size")
    if m.global_pool not in ("token", "avg") or getattr(m, "attn_pool", None) is not None:
        refuse.append(f"global_pool={m.global_pool!r}")
    if not isinstance(m.norm_pre, nn.Identity):
        refuse.append("a pre-norm before the encoder (CLIP-style)")
    if m.global_pool == "avg" and (not isinstance(m.norm, nn.Identity) or isinstance(m.fc_norm, nn.Identity)):
        refuse.append("average pooling without fc_norm")
    if m.global_pool == "token" and not isinstance(m.fc_norm, nn.Identity):
        refuse.append("token pooling with fc_norm")
    blk = m.blocks[0]
    attn = blk.attn
    if not (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)):
        refuse.append("layer scale")
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)):
        refuse.append("qk-norm / scale-norm")
    if getattr(attn, "gate", None) is not None:
        refuse.append("gated attention")
    if not isinstance(blk.mlp, TimmMlp) or not isinstance(blk.mlp.act, nn.GELU) or blk.mlp.act.approximate != "none":
        refuse.append("an MLP other than Linear-GELU-Linear")
    if not isinstance(blk.norm1, nn.LayerNorm):
        refuse.append("a norm other than LayerNorm")
    if refuse:
        raise ConfigError(f"this timm ViT has {', '.join(refuse)}, which vitviz's ViT does not implement.")
    embed_dim = m.embed_dim
    pe = m.patch_embed
    if hasattr(pe, "backbone"):
        patch = pe.patch_size[0]
        in_chans = pe.in_chans
    else:
        patch = pe.patch_size[0]
        in_chans = pe.proj.in_channels
        if pe.proj.kernel_size != pe.proj.stride or pe.proj.kernel_size[0] != pe.proj.kernel_size[1]:
            raise ConfigError("this timm ViT's patch embedding overlaps or is not square; not implemented.")
    return ViTConfig(
        img_size=pe.img_size[0], patch_size=patch, in_chans=in_chans, num_classes=m.num_classes,
        embed_dim=embed_dim, depth=len(m.blocks), num_heads=attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / embed_dim, qkv_bias=attn.qkv.bias is not None,
        pooling="mean" if m.global_pool == "avg" else "token", dropout=float(m.pos_drop.p),
        attn_dropout=float(attn.attn_drop.p), norm_eps=float(blk.norm1.eps),
    )


def _resnet_config(m: nn.Module) -> ResNetConfig:
    from timm.models.resnet import BasicBlock, Bottleneck

    if not isinstance(m.conv1, nn.Conv2d) or m.conv1.kernel_size != (7, 7):
        raise ConfigError("this timm ResNet has a deep stem (resnet*d / *c variants), which vitviz does not implement.")
    first = m.layer1[0]
    if isinstance(first, Bottleneck):
        block = "bottleneck"
        if first.conv2.groups != 1 or first.conv1.out_channels != 64:
            raise ConfigError("grouped or wide bottlenecks (ResNeXt, wide ResNet) are not implemented.")
    elif isinstance(first, BasicBlock):
        block = "basic"
    else:
        raise ConfigError(f"unknown timm ResNet block {type(first).__name__}.")
    if getattr(first, "se", None) is not None or not isinstance(getattr(first, "aa", nn.Identity()), nn.Identity):
        raise ConfigError("ResNets with squeeze-excitation or anti-aliasing are not implemented.")
    if not isinstance(first.act1, nn.ReLU):
        raise ConfigError("only ReLU ResNets are implemented.")
    for layer in (m.layer2, m.layer3, m.layer4):
        ds = layer[0].downsample
        if ds is not None and not isinstance(ds[0], nn.Conv2d):
            raise ConfigError("average-pool downsampling (resnet*d) is not implemented.")
    layers = tuple(len(getattr(m, f"layer{i}")) for i in range(1, 5))
    return ResNetConfig(layers=layers, block=block, stem="imagenet", width=m.conv1.out_channels,
                        in_chans=m.conv1.in_channels, num_classes=m.num_classes,
                        img_size=int(m.pretrained_cfg.get("input_size", (3, 224, 224))[-1]),
                        dropout=float(getattr(m, "drop_rate", 0.0)))


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def _load_file(model: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsUnavailableError(f"pretrained_file {path} does not exist.")
    if path.suffix != ".safetensors":
        raise WeightsUnavailableError(
            f"{path} is not a .safetensors file; vitviz never unpickles weight files. Convert it on a trusted "
            "machine: python -c \"import torch, safetensors.torch as s; "
            "s.save_file(torch.load('in.pth', weights_only=True), 'out.safetensors')\"."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsUnavailableError(f"cannot read weights file {path}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        # Original (e.g. JAX-converted) checkpoints may need timm's own key filter first.
        import sys

        filt = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        try:
            model.load_state_dict(filt(state, model) if filt else state, strict=True)
        except RuntimeError as err:
            raise WeightsUnavailableError(
                f"weights in {path} do not fit {type(model).__name__}: {str(err).splitlines()[0]}"
            ) from err


def _cached_weights(name: str) -> Path | None:
    """A model.safetensors for ``name`` already in the local Hugging Face cache, if any."""
    import timm

    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cfg = timm.get_pretrained_cfg(name) or timm.get_pretrained_cfg(name.split(".")[0])
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    found = try_to_load_from_cache(repo, "model.safetensors")
    return Path(found) if isinstance(found, str) else None


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub can be reached now (fast: a refused lookup answers at once)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((_HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_pretrained(name: str, **kwargs: Any) -> nn.Module:
    import timm

    cached = _cached_weights(name)
    if cached is not None:
        tm = timm.create_model(name, pretrained=False, **kwargs)
        _load_file(tm, cached)
        return tm
    how = (
        f"Download model.safetensors for {name} (https://huggingface.co/timm/{name}) on a machine with network "
        "and pass pretrained_file=PATH (CLI: --pretrained-file PATH), or use pretrained=False."
    )
    if not hub_reachable():
        raise WeightsUnavailableError(
            f"pretrained weights for {name!r} are not cached and the Hub is unreachable. {how}"
        )
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # network, auth, or missing-file errors from the hub client
        raise WeightsUnavailableError(f"could not fetch pretrained weights for {name!r}: {err}. {how}") from err
