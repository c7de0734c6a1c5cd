"""Adapters for timm's hierarchical and multi-branch transformers: Swin (v1, v2), PiT, LeViT, PVT-v2, Twins, CrossViT.

Tiny random-weight models built with timm's constructors (no downloads). Every check that a record is
right is made against something computed here from the model's own modules: the attention calls
seen by hooks, logits of the untouched model, and for Swin's windows and the pooled keys of PVT-v2 /
Twins the attention recomputed by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("timm")

from timm.models import crossvit, levit, pit, pvt_v2, swin_transformer, swin_transformer_v2, twins  # noqa: E402
from timm.models import vision_transformer as vit  # noqa: E402

from vitviz.errors import ExplainError  # noqa: E402
from vitviz.explain.adapters import Tokens, adapter_for  # noqa: E402
from vitviz.explain.adapters.timm_crossvit import TimmCrossViT  # noqa: E402
from vitviz.explain.adapters.timm_levit import TimmLevit  # noqa: E402
from vitviz.explain.adapters.timm_pit import TimmPiT  # noqa: E402
from vitviz.explain.adapters.timm_pvt import TimmPVTv2  # noqa: E402
from vitviz.explain.adapters.timm_swin import TimmSwin  # noqa: E402
from vitviz.explain.adapters.timm_twins import TimmTwins  # noqa: E402


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Break timm's zero inits (LeViT's zero BatchNorm gains make its later stages constant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight") and not p.any():
                p.fill_(1.0)  # a zero-initialised norm gain (LeViT's residual branches) takes part
            p.add_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.1))
    return model.eval()


# id: (constructor, input (H, W), adapter class, attention classes, family)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, int], type, tuple[type, ...], str]] = {
    "swin": (lambda: swin_transformer.SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5),
        (32, 32), TimmSwin, (swin_transformer.WindowAttention,), "hierarchical"),
    "swinv2": (lambda: swin_transformer_v2.SwinTransformerV2(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5),
        (32, 32), TimmSwin, (swin_transformer_v2.WindowAttention,), "hierarchical"),
    "pit": (lambda: pit.PoolingVisionTransformer(
        img_size=32, patch_size=4, stride=2, base_dims=(8, 8), depth=(1, 2), heads=(2, 4), num_classes=5),
        (32, 32), TimmPiT, (vit.Attention,), "hierarchical"),
    "pit-distilled": (lambda: pit.PoolingVisionTransformer(
        img_size=32, patch_size=4, stride=2, base_dims=(8, 8), depth=(1, 1), heads=(2, 2), num_classes=5,
        distilled=True), (32, 32), TimmPiT, (vit.Attention,), "hierarchical"),
    "levit": (lambda: levit.Levit(
        img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3), num_classes=5),
        (64, 64), TimmLevit, (levit.Attention, levit.AttentionDownsample), "hierarchical"),
    "levit-conv-distilled": (lambda: levit.LevitDistilled(
        img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3), num_classes=5, use_conv=True),
        (64, 64), TimmLevit, (levit.Attention, levit.AttentionDownsample), "hierarchical"),
    "pvt": (lambda: pvt_v2.PyramidVisionTransformerV2(
        depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=(2, 2), num_classes=5),
        (32, 48), TimmPVTv2, (pvt_v2.Attention,), "hierarchical"),
    "pvt-linear": (lambda: pvt_v2.PyramidVisionTransformerV2(
        depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=(2, 2), num_classes=5,
        linear=True), (32, 32), TimmPVTv2, (pvt_v2.Attention,), "hierarchical"),
    "twins-svt": (lambda: twins.Twins(
        img_size=32, patch_size=4, embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(2, 2),
        sr_ratios=(2, 1), wss=(4, 2), num_classes=5), (32, 32), TimmTwins,
        (twins.LocallyGroupedAttn, twins.GlobalSubSampleAttn), "hierarchical"),
    "twins-pcpvt": (lambda: twins.Twins(
        img_size=32, patch_size=4, embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(1, 1),
        sr_ratios=(2, 1), num_classes=5), (32, 32), TimmTwins, (twins.GlobalSubSampleAttn,), "hierarchical"),
    "crossvit": (lambda: crossvit.CrossVit(
        img_size=32, patch_size=(4, 8), embed_dim=(16, 32), depth=((1, 2, 1),), num_heads=(2, 2),
        mlp_ratio=(2, 2, 2), num_classes=5), (32, 32), TimmCrossViT, (vit.Attention, crossvit.CrossAttention), "vit"),
    # timm's own CrossViT configs: no fusion depth (one CrossAttentionBlock per branch), branch 1 on a rescaled image
    "crossvit-scaled": (lambda: crossvit.CrossVit(
        img_size=32, img_scale=(1.0, 0.75), patch_size=(8, 8), embed_dim=(16, 32), depth=((1, 1, 0),),
        num_heads=(2, 2), mlp_ratio=(2, 2, 1), num_classes=5), (32, 32), TimmCrossViT,
        (vit.Attention, crossvit.CrossAttention), "vit"),
}
IDS = list(FAMILIES)
_cache: dict[str, nn.Module] = {}


def build(family: str) -> nn.Module:
    if family not in _cache:
        torch.manual_seed(0)
        _cache[family] = perturb(FAMILIES[family][0]())
    return _cache[family]


def images(family: str, b: int = 2) -> torch.Tensor:
    h, w = FAMILIES[family][1]
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def attention_calls(model: nn.Module, x: torch.Tensor, classes: tuple[type, ...]) -> list[str]:
    """Module paths of the attention modules, in the order the model calls them."""
    seen: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=n: seen.append(n))
               for n, m in model.named_modules() if type(m) in classes]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def state(model: nn.Module) -> dict[str, tuple]:
    """Hooks and instance attributes of every module (what recording must leave as it found it)."""
    out = {}
    for name, m in model.named_modules():
        hooks = tuple(len(getattr(m, a)) for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                    "_forward_hooks_with_kwargs", "_backward_pre_hooks"))
        plain = tuple(sorted((k, repr(v)) for k, v in vars(m).items()
                             if not k.startswith("_") and not isinstance(v, (torch.Tensor, dict))))
        out[name] = (hooks, tuple(sorted(vars(m))), plain)
    return out


# --- every family ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", IDS)
def test_adapter_for_finds_the_family(family):
    model = build(family)
    adapter = adapter_for(model)
    assert type(adapter) is FAMILIES[family][2]
    assert adapter.kind == "transformer" and adapter.family == FAMILIES[family][4]


@pytest.mark.parametrize("family", IDS)
def test_records_match_the_attention_calls(family):
    model = build(family)
    x = images(family)
    adapter = adapter_for(model)
    calls = attention_calls(model, x, FAMILIES[family][3])
    with torch.no_grad():
        expected = model(x)
    forwards: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with torch.no_grad():
            logits, rec = adapter.record_forward(x)
    finally:
        handle.remove()
    assert forwards == [1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert [r.name for r in rec.records] == calls  # one record per call, in call order
    assert adapter.depth() == len({r.block for r in rec.records})
    for r in rec.records:
        dense = r.dense()
        assert dense.shape[0] == x.shape[0] and dense.shape[-2:] == (r.queries.n, r.keys.n)
        assert dense.shape[1] == r.weights.shape[1]  # heads
        torch.testing.assert_close(dense.sum(-1), torch.ones(dense.shape[:-1]), atol=1e-5, rtol=0)
    stages = [r.stage for r in rec.records]
    if not family.startswith("crossvit"):
        blocks = [r.block for r in rec.records]
        assert blocks == list(range(len(blocks)))  # unique, increasing across the whole model
        assert stages == sorted(stages) and stages[-1] > 0
        final = adapter.final_tokens(*x.shape[-2:])
        assert rec.records[-1].queries == final
        for r in rec.records:  # a stage's records share its query grid
            assert r.queries.grid == rec.records[[s.stage for s in rec.records].index(r.stage)].queries.grid


@pytest.mark.parametrize("family", IDS)
def test_recording_leaves_the_model_as_it_was(family):
    model = build(family)
    x = images(family)
    adapter = adapter_for(model)
    before = state(model)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    _, rec = adapter.record_forward(x)  # with gradients
    assert state(model) == before
    with pytest.raises(RuntimeError, match="boom"), adapter.recording(*x.shape[-2:]):
        model(x)
        raise RuntimeError("boom")
    assert state(model) == before
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("family", IDS)
def test_recorded_weights_are_in_the_graph(family):
    model = build(family)
    x = images(family)
    adapter = adapter_for(model)
    logits, rec = adapter.record_forward(x)
    score = logits[:, 1].sum()
    grads = torch.autograd.grad(score, [r.weights for r in rec.records], allow_unused=True)
    assert all(g is not None for g in grads), [r.name for r, g in zip(rec.records, grads, strict=True) if g is None]
    assert all(r.dense(g).shape == r.dense().shape for r, g in zip(rec.records, grads, strict=True))
    assert float(sum(g.abs().sum() for g in grads)) > 0


@pytest.mark.parametrize("family", IDS)
def test_reduce_applies_per_layer(family):
    model = build(family)
    x = images(family)
    with torch.no_grad():
        _, full = adapter_for(model).record_forward(x)
        _, rec = adapter_for(model).record_forward(x, reduce=lambda a: a.mean(dim=1, keepdim=True))
    for r, f in zip(rec.records, full.records, strict=True):
        assert r.weights.shape[1] == 1
        torch.testing.assert_close(r.dense(), f.dense().mean(dim=1, keepdim=True))


@pytest.mark.parametrize("family", IDS)
def test_refuses_rollout_across_stages(family):
    adapter = adapter_for(build(family))
    for method in ("rollout", "grad-rollout", "chefer"):
        why = adapter.refusal(method)
        assert why is not None and "method='attention'" in why and "gradcam" in why
    assert adapter.refusal("attention") is None and adapter.refusal("gradcam") is None
    if family.startswith("swin"):
        assert "patch merging" in adapter.refusal("rollout")
    if family.startswith("crossvit"):
        assert "class token" in adapter.refusal("chefer")


@pytest.mark.parametrize("family", IDS)
def test_readout_and_gradcam(family):
    model = build(family)
    x = images(family)
    adapter = adapter_for(model)
    tokens = adapter.final_tokens(*x.shape[-2:])
    readout = adapter.readout(tokens)
    assert readout.shape == (tokens.n,) and float(readout.sum()) == pytest.approx(1.0)
    with torch.no_grad():
        expected = model(x)
    cam = adapter.cam_forward(x, None)
    fmap = cam.reshape(cam.activations)
    assert fmap.ndim == 4 and fmap.shape[0] == x.shape[0] and tuple(fmap.shape[-2:]) == tokens.grid
    torch.testing.assert_close(cam.logits, expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(cam.logits[:, 0].sum(), cam.activations)
    assert float(cam.reshape(grad).abs().sum()) > 0
    feats, cell, logits = adapter.grid_features(x)
    assert feats.shape[0] == x.shape[0] and feats.ndim == 4 and min(cell) >= 1
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# --- Swin: windows on the image ---------------------------------------------------------------------------

def _first_input(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``module`` is called with (its first argument) when ``model`` runs on ``x``."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _swin_reference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A v1 block's attention over its whole grid, (B, heads, H*W, H*W), from its own weights, by hand."""
    attn = block.attn
    b, h, w, c = x.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).reshape(b, h * w, 3, heads, -1)  # image tokens in row-major order
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, heads, N, hd)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    sr, sc = ((rows - sh) % h).flatten(), ((cols - sw) % w).flatten()  # where each token sits after the roll
    same_window = ((sr[:, None] // wh) == (sr[None] // wh)) & ((sc[:, None] // ww) == (sc[None] // ww))

    def region(s: torch.Tensor, size: int, win: int, shift: int) -> torch.Tensor:
        return (s >= size - win).long() + (s >= size - shift).long()  # timm's three slices of the rolled grid

    same_region = (region(sr, h, wh, sh)[:, None] == region(sr, h, wh, sh)[None]) & (
        region(sc, w, ww, sw)[:, None] == region(sc, w, ww, sw)[None])
    table = attn.relative_position_bias_table  # ((2wh-1)*(2ww-1), heads)
    dr = (sr % wh)[:, None] - (sr % wh)[None] + wh - 1
    dc = (sc % ww)[:, None] - (sc % ww)[None] + ww - 1
    bias = table[(dr * (2 * ww - 1) + dc).clamp(min=0)].permute(2, 0, 1)  # (heads, N, N)
    logits = logits + bias + (~same_region).float() * -100.0
    logits = logits.masked_fill(~same_window, float("-inf"))
    return logits.softmax(dim=-1)


def test_swin_dense_attention_equals_a_hand_computed_reference():
    torch.manual_seed(3)
    model = perturb(swin_transformer.SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5,
        strict_img_size=False), seed=3)
    x = torch.randn(2, 3, 32, 48)  # a 16x24 grid: rows and columns differ
    with torch.no_grad():
        _, rec = adapter_for(model).record_forward(x)
    for stage, layer in enumerate(model.layers):
        for j, block in enumerate(layer.blocks):
            r = rec.records[2 * stage + j]
            assert (r.stage, r.block, r.name) == (stage, 2 * stage + j, f"layers.{stage}.blocks.{j}.attn")
            assert bool(any(block.shift_size)) == (j == 1)
            inp = _first_input(model, block, x)
            assert r.queries.grid == tuple(inp.shape[1:3]) == ((16, 24) if stage == 0 else (8, 12))
            assert r.queries.cell == ((2, 2) if stage == 0 else (4, 4)) and r.keys == r.queries
            with torch.no_grad():
                expected = _swin_reference(block, inp)
            torch.testing.assert_close(r.dense(), expected, atol=1e-5, rtol=1e-4)


def test_swin_shifted_window_maps_back_to_image_positions():
    model = build("swin")
    x = images("swin")
    with torch.no_grad():
        _, rec = adapter_for(model).record_forward(x)
    r = rec.records[1]  # stage 0, shifted by (2, 2), 16x16 grid, 4x4 windows
    h = w = 16
    dense, win = r.dense(), r.weights.view(2, 16, 2, 16, 16)  # (B, windows, heads, 16, 16)
    # Token (0, 0) sits at (14, 14) of the rolled grid: in the last window, slot (2, 2); that window holds
    # image rows and columns {14, 15, 0, 1}, and only {0, 1} x {0, 1} is in (0, 0)'s region.
    members = [r_ * w + c for r_ in (14, 15, 0, 1) for c in (14, 15, 0, 1)]
    row = dense[:, :, 0]  # (B, heads, 256)
    outside = torch.ones(h * w, dtype=torch.bool)
    outside[members] = False
    assert float(row[:, :, outside].abs().max()) == 0.0
    torch.testing.assert_close(row[:, :, members], win[:, -1, :, 2 * 4 + 2])
    assert float(row[:, :, [0, 1, w, w + 1]].sum(-1).min()) > 1 - 1e-5  # the mask leaves the wrapped pairs ~0
    # The unshifted block: token (5, 6) is in window (1, 1), slot (1, 2), with rows 4..7 and columns 4..7.
    r0, token = rec.records[0], 5 * w + 6
    members = [r_ * w + c for r_ in range(4, 8) for c in range(4, 8)]
    torch.testing.assert_close(r0.dense()[:, :, token, members], r0.weights.view(2, 16, 2, 16, 16)[:, 5, :, 6])


def test_swin_gradcam_map_is_the_nhwc_features_on_the_grid():
    model = perturb(swin_transformer.SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5,
        strict_img_size=False))
    x = torch.randn(1, 3, 32, 48)
    cam = adapter_for(model).cam_forward(x, None)
    fmap = cam.reshape(cam.activations)  # (B, C, 8, 12)
    assert cam.activations.shape == (1, 8, 12, 32) and fmap.shape == (1, 32, 8, 12)
    torch.testing.assert_close(fmap[0, :, 2, 7], cam.activations[0, 2, 7])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_swin_padded_windows_keep_real_pairs_in_place(version):
    cls = swin_transformer.SwinTransformer if version == "v1" else swin_transformer_v2.SwinTransformerV2
    torch.manual_seed(4)
    model = perturb(cls(img_size=24, patch_size=2, window_size=8, embed_dim=16, depths=(2,), num_heads=(2,),
                        num_classes=5), seed=4)  # a 12x12 grid in 8x8 windows: padded to 16x16, shift 4
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        _, rec = adapter_for(model).record_forward(x)
    for r, block in zip(rec.records, model.layers[0].blocks, strict=True):
        (sh, sw), (wh, ww) = block.shift_size, block.window_size
        index = torch.arange(144).view(1, 12, 12, 1)
        rolled = torch.roll(index, shifts=(-sh, -sw), dims=(1, 2))
        padded = F.pad(rolled, (0, 0, 0, 4, 0, 4), value=-1)  # as the block pads its rolled grid
        slots = swin_transformer.window_partition(padded, (wh, ww)).reshape(-1, wh * ww)  # timm's own layout
        dense, win = r.dense(), r.weights  # (1, heads, 144, 144), (windows, heads, 64, 64)
        expected = torch.zeros_like(dense)
        for n, members in enumerate(slots):
            real = (members >= 0).nonzero().squeeze(1)
            expected[0][:, members[real][:, None], members[real][None]] = win[n][:, real][:, :, real]
        torch.testing.assert_close(dense, expected, atol=0, rtol=0)
        sums = dense.sum(-1)
        assert float(sums.max()) <= 1 + 1e-5
        if not any(block.shift_size):  # the padding keys took part of the border rows (the shifted block's mask
            assert float(sums.min()) < 0.99  # puts the padding in a region of its own, so there they get ~0)


# --- pooled keys: PVT-v2 and Twins' global sub-sampled attention ----------------------------------------

def _attention_input(model: nn.Module, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    seen = []
    handle = attn.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    tokens, size = seen[0]
    return tokens, (int(size[0]), int(size[1]))


def _pooled_reference(attn: nn.Module, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Spatial-reduction attention by hand: keys from the module's own ``sr`` conv and norm."""
    b, n, c = tokens.shape
    heads = attn.num_heads
    q = attn.q(tokens).view(b, n, heads, -1).transpose(1, 2)  # (B, heads, N, hd)
    grid = tokens.transpose(1, 2).reshape(b, c, *size)  # (B, C, H, W)
    pooled = attn.norm(attn.sr(grid).flatten(2).transpose(1, 2))  # (B, Nk, C)
    k = attn.kv(pooled)[..., :c].reshape(b, -1, heads, c // heads).transpose(1, 2)  # (B, heads, Nk, hd)
    return (q @ k.transpose(-2, -1) / math.sqrt(c // heads)).softmax(dim=-1)


@pytest.mark.parametrize(("family", "index"), [("pvt", 0), ("twins-pcpvt", 0), ("twins-svt", 1)])
def test_pooled_keys_equal_a_hand_computed_reference(family, index):
    model = build(family)
    x = images(family)
    adapter = adapter_for(model)
    with torch.no_grad():
        _, rec = adapter.record_forward(x)
    r = rec.records[index]
    attn = model.get_submodule(r.name)
    assert attn.sr is not None
    tokens, size = _attention_input(model, attn, x)
    with torch.no_grad():
        expected = _pooled_reference(attn, tokens, size)
    torch.testing.assert_close(r.weights, expected, atol=1e-5, rtol=1e-4)
    ratio = attn.sr.stride[0]
    assert r.queries.grid == size and r.keys.grid == (size[0] // ratio, size[1] // ratio)
    assert r.keys.cell == (r.queries.cell[0] * ratio, r.queries.cell[1] * ratio)
    assert r.keys.n == expected.shape[-1] < r.queries.n == expected.shape[-2]
    if family == "pvt":  # a 32x48 input: an 8x12 grid of 4 px cells, keys 4x6 of 8 px
        assert (r.queries.grid, r.queries.cell, r.keys.grid) == ((8, 12), (4, 4), (4, 6))


def test_linear_pvt_pools_keys_to_seven_by_seven():
    model = build("pvt-linear")
    with torch.no_grad():
        _, rec = adapter_for(model).record_forward(images("pvt-linear"))
    assert [r.keys.grid for r in rec.records] == [(7, 7), (7, 7)]
    assert [r.queries.grid for r in rec.records] == [(8, 8), (4, 4)]
    assert all(r.weights.shape[-1] == 49 for r in rec.records)


def test_twins_windows_with_padding_map_onto_the_grid():
    torch.manual_seed(5)
    model = perturb(twins.Twins(img_size=40, patch_size=4, embed_dims=(16,), num_heads=(2,), mlp_ratios=(2,),
                                depths=(1,), sr_ratios=(1,), wss=(4,), num_classes=5), seed=5)
    x = torch.randn(2, 3, 40, 40)  # a 10x10 grid in 4x4 windows: padded to 12x12, 9 windows
    with torch.no_grad():
        expected_logits = model(x)
        logits, rec = adapter_for(model).record_forward(x)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    (r,) = rec.records
    assert r.weights.shape == (2 * 9, 2, 16, 16) and r.queries.grid == (10, 10)
    dense, win = r.dense(), r.weights.view(2, 9, 2, 16, 16)
    for token in (0, 37, 99):  # (0, 0), (3, 7), (9, 9)
        i, j = divmod(token, 10)
        n, slot = (i // 4) * 3 + j // 4, (i % 4) * 4 + j % 4
        cells = [(i // 4 * 4 + a, j // 4 * 4 + b) for a in range(4) for b in range(4)]  # the window, row-major
        real = [s for s, (rr, cc) in enumerate(cells) if rr < 10 and cc < 10]  # slots that are not padding
        members = [cells[s][0] * 10 + cells[s][1] for s in real]
        row = dense[:, :, token]  # (B, heads, 100)
        torch.testing.assert_close(row[:, :, members], win[:, n, :, slot][:, :, real])
        torch.testing.assert_close(row.sum(-1), win[:, n, :, slot][:, :, real].sum(-1))  # zero elsewhere
    assert float(dense.sum(-1)[:, :, 99].max()) < 0.99  # the corner window is mostly padding


# --- PiT, LeViT, CrossViT ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["pit", "pit-distilled"])
def test_pit_stages_carry_class_tokens(family):
    model = build(family)
    adapter = adapter_for(model)
    with torch.no_grad():
        _, rec = adapter.record_forward(images(family))
    prefix = 2 if family == "pit-distilled" else 1
    assert adapter.readout_kind() == ("dist" if prefix == 2 else "token")
    grids = [(r.stage, r.queries.prefix, r.queries.grid, r.queries.cell) for r in rec.records]
    assert grids[0] == (0, prefix, (15, 15), (2, 2)) and grids[-1] == (1, prefix, (8, 8), (4, 4))
    pos, grid, pos_prefix = adapter.position_embedding()
    assert pos.shape == (1, 15 * 15, model.pos_embed.shape[1]) and grid == (15, 15) and pos_prefix == 0


@pytest.mark.parametrize("family", ["levit", "levit-conv-distilled"])
def test_levit_downsampling_attention_has_pooled_queries(family):
    model = build(family)
    adapter = adapter_for(model)
    with torch.no_grad():
        _, rec = adapter.record_forward(images(family))
    down = rec.records[1]
    assert down.name == "stages.1.downsample.attn_downsample" and down.weights.shape == (2, 4, 4, 16)
    assert (down.queries.grid, down.queries.cell, down.keys.grid, down.keys.cell) == ((2, 2), (32, 32), (4, 4),
                                                                                      (16, 16))
    assert adapter.final_tokens(64, 64).grid == (2, 2) and adapter.heads() is None
    with pytest.raises(ExplainError, match="64x64"):
        adapter.final_tokens(48, 48)


def test_levit_recorded_weights_equal_a_hand_computed_reference():
    model = build("levit")
    x = images("levit")
    with torch.no_grad():
        _, rec = adapter_for(model).record_forward(x)
    attn = model.stages[0].blocks[0].attn
    tokens = _first_input(model, attn, x)  # (B, N, C)
    b, n, _ = tokens.shape
    with torch.no_grad():
        qkv = attn.qkv(tokens).view(b, n, attn.num_heads, -1)  # (B, N, heads, 2*kd + vd)
        q, k = qkv[..., :attn.key_dim].transpose(1, 2), qkv[..., attn.key_dim:2 * attn.key_dim].transpose(1, 2)
        pos = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")).flatten(1)  # (2, 16)
        offset = (pos[:, :, None] - pos[:, None, :]).abs()  # (2, 16, 16): |row|, |col| offsets
        bias = attn.attention_biases[:, offset[0] * 4 + offset[1]]  # (heads, 16, 16)
        expected = (q @ k.transpose(-2, -1) * attn.key_dim ** -0.5 + bias).softmax(dim=-1)
    torch.testing.assert_close(rec.records[0].weights, expected, atol=1e-5, rtol=1e-4)


def test_crossvit_records_each_branch_on_its_own_tokens():
    model = build("crossvit")
    adapter = adapter_for(model)
    with torch.no_grad():
        _, rec = adapter.record_forward(images("crossvit"))
    small, large = adapter.branch_tokens(32, 32)
    assert (small.prefix, small.grid, small.cell) == (1, (8, 8), (4, 4))
    assert (large.prefix, large.grid, large.cell) == (1, (4, 4), (8, 8))
    got = [(r.name, r.stage, r.block, r.queries.n, r.keys) for r in rec.records]
    assert got == [
        ("blocks.0.blocks.0.0.attn", 0, 0, 65, small),
        ("blocks.0.blocks.1.0.attn", 1, 0, 17, large),
        ("blocks.0.blocks.1.1.attn", 1, 1, 17, large),
        ("blocks.0.fusion.0.0.attn", 1, 2, 1, large),  # branch 0's class token over branch 1's patches
        ("blocks.0.fusion.1.0.attn", 0, 2, 1, small),
    ]
    assert rec.records[3].q_index.tolist() == [0]  # the query is branch 0's class token: final token 0
    assert all(r.q_index is None for r in rec.records if r is not rec.records[3])
    assert rec.records[3].queries == Tokens(prefix=1, grid=(0, 0), cell=(4, 4))  # one query: a class token
    assert adapter.final_tokens(32, 32) == small and adapter.readout_kind() == "token"
    pos, grid, prefix = adapter.position_embedding()
    assert pos is model.pos_embed_0 and grid == (8, 8) and prefix == 1


def test_crossvit_without_fusion_depth_and_rescaled_branch():
    model = build("crossvit-scaled")
    adapter = adapter_for(model)
    with torch.no_grad():
        _, rec = adapter.record_forward(images("crossvit-scaled"))
    small, large = adapter.branch_tokens(32, 32)
    assert (small.grid, small.cell, large.grid, large.cell) == ((4, 4), (8, 8), (3, 3), (11, 11))  # 8 px of 24
    assert [(r.name, r.stage, r.block, r.keys) for r in rec.records] == [
        ("blocks.0.blocks.0.0.attn", 0, 0, small), ("blocks.0.blocks.1.0.attn", 1, 0, large),
        ("blocks.0.fusion.0.attn", 1, 1, large), ("blocks.0.fusion.1.attn", 0, 1, small)]
    assert adapter.depth() == 2


def test_non_timm_subclasses_are_not_matched():
    class Mine(swin_transformer.SwinTransformer):
        pass

    model = Mine(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
                 num_classes=5)
    assert not TimmSwin.matches(model)
    assert TimmSwin.matches(swin_transformer.SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                                             depths=(2,), num_heads=(2,), num_classes=5))


# --- through the public API ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", IDS)
def test_every_method_gives_a_varied_map_or_a_reason(family, request):
    from vitviz.explain import explain

    model = build(family)
    x = images(family)
    # the attention methods, Grad-CAM and similarity (the newer methods have their own test files)
    for method in ("attention", "rollout", "grad-rollout", "chefer", "gradcam", "similarity"):
        try:
            maps = explain(model, x, method=method)
        except ExplainError as err:
            assert method in ("rollout", "grad-rollout", "chefer"), (method, str(err))
            assert "method='attention'" in str(err)
            continue
        assert maps.shape == (x.shape[0], *x.shape[-2:]), method
        assert bool(torch.isfinite(maps).all()), method
        assert float(maps.std(dim=(1, 2)).min()) > 1e-3, method  # not constant
