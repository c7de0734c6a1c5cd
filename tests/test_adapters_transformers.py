"""Adapters for timm's EVA, BEiT, CaiT, XCiT and ConViT: tiny random-weight models, no downloads.

Every family is checked for: which adapter it gets; one recorded forward that equals the plain one;
one record per attention layer with the right shapes and placement; one layer's weights against a hand
computation from the module's own parameters (rotary embedding, relative position bias, talking heads,
cross-covariance, gated positional attention); the readout against the model's own pooling; Grad-CAM's
feature maps; the model left exactly as it was; what is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import adapter_for
from vitviz.explain.adapters.timm_beit import TimmBeit
from vitviz.explain.adapters.timm_cait import TimmCait
from vitviz.explain.adapters.timm_convit import TimmConvit
from vitviz.explain.adapters.timm_eva import TimmEva
from vitviz.explain.adapters.timm_xcit import TimmXcit

METHODS = ("attention", "rollout", "grad-rollout", "chefer", "gradcam")
TOKEN_METHODS = ("rollout", "grad-rollout", "chefer")


def _perturb_eva(m: nn.Module) -> None:
    for blk in m.blocks:  # the q bias starts at zero: make it count
        if getattr(blk.attn, "q_bias", None) is not None:
            blk.attn.q_bias.normal_(0, 0.5)


def _perturb_beit(m: nn.Module) -> None:
    for blk in m.blocks:  # the relative position bias starts at zero: make it count
        blk.attn.relative_position_bias_table.normal_(0, 1.0)
        blk.attn.q_bias.normal_(0, 0.5)


def _perturb_cait(m: nn.Module) -> None:
    for blk in m.blocks:  # the head mixing starts near zero with no bias: make both count
        blk.attn.proj_l.weight.normal_(0, 0.5)
        blk.attn.proj_w.weight.normal_(0, 0.5)
        blk.attn.proj_w.bias.normal_(0, 0.1)


def _perturb_xcit(m: nn.Module) -> None:
    for blk in m.blocks:  # temperatures start at one
        blk.attn.temperature.uniform_(0.5, 3.0)


def _perturb_convit(m: nn.Module) -> None:
    for blk in m.blocks[: m.local_up_to_layer]:  # every gate starts at sigmoid(1): give each head its own
        blk.attn.gating_param.normal_(0, 1.5)


# id: (timm name, kwargs, image side, adapter class, perturbation, seed)
FAMILIES: dict[str, tuple[str, dict, int, type, Callable[[nn.Module], None], int]] = {
    "eva02": ("eva02_tiny_patch14_224", dict(depth=2), 42, TimmEva, _perturb_eva, 0),
    "eva-rope-reg": ("vit_medium_patch16_rope_reg1_gap_256", dict(depth=2, embed_dim=64, num_heads=4, init_values=0.5),
                     48, TimmEva, _perturb_eva, 0),
    "eva-rope-mixed": ("vit_small_patch16_rope_mixed_224", dict(depth=2, embed_dim=48, num_heads=3, init_values=0.5),
                       48, TimmEva, _perturb_eva, 0),
    "beit": ("beitv2_base_patch16_224", dict(depth=2, embed_dim=48, num_heads=3, init_values=0.5), 48, TimmBeit,
             _perturb_beit, 0),
    "cait": ("cait_xxs24_224", dict(depth=2, depth_token_only=2, embed_dim=48, num_heads=3, init_values=0.5), 48,
             TimmCait, _perturb_cait, 0),
    "xcit": ("xcit_nano_12_p16_224", dict(depth=2, cls_attn_layers=2, embed_dim=48, num_heads=3), 48, TimmXcit,
             _perturb_xcit, 2),
    "convit": ("convit_tiny", dict(patch_size=8, depth=3, local_up_to_layer=2, embed_dim=8, num_heads=4), 32,
               TimmConvit, _perturb_convit, 0),
}


class Built:
    def __init__(self, key: str) -> None:
        name, kwargs, side, cls, perturb, seed = FAMILIES[key]
        torch.manual_seed(seed)
        self.key, self.cls, self.side = key, cls, side
        self.model = timm.create_model(name, pretrained=False, num_classes=7, img_size=side, **kwargs).eval()
        with torch.no_grad():
            perturb(self.model)
        self.x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            self.logits = self.model(self.x)


_CACHE: dict[str, Built] = {}


@pytest.fixture(params=list(FAMILIES), scope="module")
def built(request) -> Built:
    if request.param not in _CACHE:
        _CACHE[request.param] = Built(request.param)
    return _CACHE[request.param]


def _get(key: str) -> Built:
    if key not in _CACHE:
        _CACHE[key] = Built(key)
    return _CACHE[key]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "attn_drop", None), nn.Module)]


def _record_with_inputs(b: Built, names: list[str]) -> tuple[torch.Tensor, list, dict[str, tuple[tuple, dict]]]:
    """record_forward under no_grad, also keeping the named attention modules' inputs (args, kwargs)."""
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name in names:
        def keep(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            seen[name] = (args, kwargs)

        handles.append(b.model.get_submodule(name).register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            logits, rec = adapter_for(b.model).record_forward(b.x)
    finally:
        for h in handles:
            h.remove()
    return logits, rec.records, seen


# --- 1, 2, 3: the adapter, one forward, the records ----------------------------------------------------------

def test_adapter_for_picks_the_family_adapter(built: Built) -> None:
    adapter = adapter_for(built.model)
    assert type(adapter) is built.cls
    assert adapter.kind == "transformer" and adapter.family == "vit"
    assert built.cls.matches(built.model)
    others = {TimmEva, TimmBeit, TimmCait, TimmXcit, TimmConvit} - {built.cls}
    assert not any(cls.matches(built.model) for cls in others)


def test_adapters_ignore_non_timm_lookalikes() -> None:
    from timm.models.cait import Cait

    class Mine(Cait):  # a subclass outside timm is not timm's model
        pass

    Mine.__module__ = "mypackage.models"
    torch.manual_seed(0)
    model = Mine(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, depth_token_only=1, num_classes=3)
    assert not TimmCait.matches(model)


def test_record_forward_is_one_plain_forward(built: Built) -> None:
    calls = []
    handle = built.model.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    try:
        with torch.no_grad():
            logits, _rec = adapter_for(built.model).record_forward(built.x)
    finally:
        handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(logits, built.logits, atol=1e-5, rtol=0)


def _expected_layers(b: Built) -> list[tuple[str, bool, bool]]:
    """(module name, token attention, a softmax row) per attention layer, in call order."""
    m = b.model
    if b.cls is TimmCait:
        return ([(f"blocks.{i}.attn", True, False) for i in range(len(m.blocks))]
                + [(f"blocks_token_only.{j}.attn", True, True) for j in range(len(m.blocks_token_only))])
    if b.cls is TimmXcit:
        return ([(f"blocks.{i}.attn", False, True) for i in range(len(m.blocks))]
                + [(f"cls_attn_blocks.{j}.attn", True, True) for j in range(len(m.cls_attn_blocks))])
    return [(f"blocks.{i}.attn", True, True) for i in range(len(m.blocks))]


def test_one_record_per_attention_layer(built: Built) -> None:
    adapter = adapter_for(built.model)
    with torch.no_grad():
        _logits, rec = adapter.record_forward(built.x)
    expected = _expected_layers(built)
    assert [r.name for r in rec.records] == [name for name, _, _ in expected]
    assert len(rec.records) == adapter.depth()
    assert [r.block for r in rec.records] == list(range(adapter.depth()))  # increasing, unique
    final = adapter.final_tokens(built.side, built.side)
    heads = adapter.heads()
    assert heads == built.model.blocks[0].attn.num_heads
    for r, (_name, token, softmax) in zip(rec.records, expected, strict=True):
        assert r.token_attention is token
        w = r.dense()
        if token:
            nq = len(r.q_index) if r.q_index is not None else r.queries.n
            nk = len(r.k_index) if r.k_index is not None else r.keys.n
            assert w.shape == (2, heads, nq, nk)
            for index in (r.q_index, r.k_index):  # placed inside the final token set, in order, no repeats
                if index is not None:
                    assert index.dtype == torch.long and index.min() >= 0 and index.max() < final.n
                    assert torch.all(index[1:] > index[:-1])
        else:  # channels: (B, heads, d, d)
            d = built.model.embed_dim // heads
            assert w.shape == (2, heads, d, d)
        assert torch.isfinite(w).all()
        if softmax:
            assert (w >= 0).all()
            torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5, rtol=0)


def test_reduce_is_applied_as_each_layer_runs(built: Built) -> None:
    adapter = adapter_for(built.model)
    with torch.no_grad():
        _, full = adapter.record_forward(built.x)
        _, reduced = adapter.record_forward(built.x, reduce=lambda a: a.mean(dim=1, keepdim=True))
    assert len(full.records) == len(reduced.records)
    for f, r in zip(full.records, reduced.records, strict=True):
        assert r.weights.shape[1] == 1
        torch.testing.assert_close(r.weights, f.weights.mean(dim=1, keepdim=True))


def test_token_sets_and_placement(built: Built) -> None:
    """Final tokens match forward_features; CaiT / ConViT patch-only layers and class queries are placed."""
    adapter = adapter_for(built.model)
    final = adapter.final_tokens(built.side, built.side)
    with torch.no_grad():
        feats = built.model.forward_features(built.x)  # (B, N, D)
        _, rec = adapter.record_forward(built.x)
    assert feats.shape[1] == final.n
    patches = torch.arange(1, final.n)
    for r in rec.records:
        patch_only = (built.cls is TimmCait and r.name.startswith("blocks.")) or (
            built.cls is TimmConvit and r.block < built.model.local_up_to_layer)
        class_query = r.name.startswith(("blocks_token_only.", "cls_attn_blocks."))
        if patch_only:
            assert r.queries.prefix == r.keys.prefix == 0 and r.queries.grid == final.grid
            assert torch.equal(r.q_index.cpu(), patches) and torch.equal(r.k_index.cpu(), patches)
        elif class_query:
            assert r.queries.n == 1 and r.q_index.tolist() == [0]
            assert r.keys == final and r.k_index is None
        elif r.token_attention:
            assert r.queries == r.keys == final and r.q_index is None and r.k_index is None


# --- 4: one layer by hand --------------------------------------------------------------------------------------

def _rotate(x: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    """Rotary embedding from a [sin, cos] table: x cos + rot(x) sin."""
    sin, cos = rope.chunk(2, dim=-1)
    if half:
        x1, x2 = x.chunk(2, dim=-1)
        turned = torch.cat([-x2, x1], dim=-1)
    else:  # interleaved pairs (x0, x1) -> (-x1, x0)
        turned = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos + turned * sin


def _eva_by_hand(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    b, n, _ = x.shape
    h = attn.num_heads
    if attn.qkv is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:  # EvaAttention: q and v biases, none on k
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        qkv = (x @ attn.qkv.weight.T + (0 if bias is None else bias)).reshape(b, n, 3, h, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, h, N, hd)
    else:
        q = attn.q_proj(x).reshape(b, n, h, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, -1, q.shape[-1]).transpose(1, 2)
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p = attn.num_prefix_tokens
        half = bool(getattr(attn, "rotate_half", False))
        q = torch.cat([q[:, :, :p], _rotate(q[:, :, p:], rope, half)], dim=2)
        k = torch.cat([k[:, :, :p], _rotate(k[:, :, p:], rope, half)], dim=2)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, N, N)


@pytest.mark.parametrize("key", ["eva02", "eva-rope-reg", "eva-rope-mixed"])
def test_eva_layer_by_hand_with_rotary_positions(key: str) -> None:
    b = _get(key)
    name = "blocks.1.attn"
    _, records, seen = _record_with_inputs(b, [name])
    args, kwargs = seen[name]
    x, rope = args[0], kwargs.get("rope")
    assert rope is not None  # every model here has rotary positions
    expected_kind = "AttentionRope" if key == "eva-rope-mixed" else "EvaAttention"
    assert type(b.model.get_submodule(name)).__name__ == expected_kind
    with torch.no_grad():
        by_hand = _eva_by_hand(b.model.get_submodule(name), x, rope)
        without_rope = _eva_by_hand(b.model.get_submodule(name), x, None)
    recorded = next(r for r in records if r.name == name).weights
    torch.testing.assert_close(recorded, by_hand, atol=1e-5, rtol=1e-4)
    assert (recorded - without_rope).abs().max() > 1e-3  # the rotary embedding matters: a test that can fail


def test_beit_layer_by_hand_with_relative_position_bias() -> None:
    b = _get("beit")
    name = "blocks.1.attn"
    _, records, seen = _record_with_inputs(b, [name])
    attn = b.model.get_submodule(name)
    x = seen[name][0][0]  # (B, N, D)
    n, h = x.shape[1], attn.num_heads
    with torch.no_grad():
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        qkv = (x @ attn.qkv.weight.T + bias).reshape(x.shape[0], n, 3, h, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, h, N, hd)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, N, N)
        table = attn.relative_position_bias_table[attn.relative_position_index.reshape(-1)]  # (N*N, h)
        rel = table.reshape(n, n, h).permute(2, 0, 1)  # (h, N, N)
        by_hand = torch.softmax(logits + rel, dim=-1)
        without_bias = torch.softmax(logits, dim=-1)
    recorded = next(r for r in records if r.name == name).weights
    torch.testing.assert_close(recorded, by_hand, atol=1e-5, rtol=1e-4)
    assert (recorded - without_bias).abs().max() > 1e-3


def test_cait_talking_heads_and_class_attention_by_hand() -> None:
    b = _get("cait")
    sa, ca = "blocks.1.attn", "blocks_token_only.1.attn"
    _, records, seen = _record_with_inputs(b, [sa, ca])
    attn = b.model.get_submodule(sa)
    x = seen[sa][0][0]  # (B, N, D): the patches only
    n_patches = b.model.patch_embed.num_patches
    assert x.shape[1] == n_patches
    h = attn.num_heads
    with torch.no_grad():
        qkv = attn.qkv(x).reshape(x.shape[0], x.shape[1], 3, h, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, h, N, hd)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, N, N)
        mixed = torch.einsum("bjqk,ij->biqk", logits, attn.proj_l.weight) + attn.proj_l.bias.view(1, h, 1, 1)
        soft = torch.softmax(mixed, dim=-1)
        by_hand = torch.einsum("bjqk,ij->biqk", soft, attn.proj_w.weight) + attn.proj_w.bias.view(1, h, 1, 1)
    rec_sa = next(r for r in records if r.name == sa)
    torch.testing.assert_close(rec_sa.weights, by_hand, atol=1e-5, rtol=1e-4)
    # Not a softmax: each head's rows sum to proj_w's row sum plus N times its bias.
    with torch.no_grad():
        row_sums = attn.proj_w.weight.sum(1) + n_patches * attn.proj_w.bias  # (h,)
    torch.testing.assert_close(rec_sa.weights.sum(-1), row_sums.view(1, h, 1).expand(2, h, n_patches),
                               atol=1e-5, rtol=1e-4)
    assert (row_sums - 1).abs().max() > 1e-2

    cls_attn = b.model.get_submodule(ca)
    u = seen[ca][0][0]  # (B, 1 + N, D): norm1([class, patches])
    assert u.shape[1] == 1 + n_patches
    with torch.no_grad():
        q = cls_attn.q(u[:, :1]).reshape(u.shape[0], 1, h, -1).transpose(1, 2)  # (B, h, 1, hd)
        k = cls_attn.k(u).reshape(u.shape[0], u.shape[1], h, -1).transpose(1, 2)  # (B, h, 1+N, hd)
        by_hand = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, 1, 1+N)
    torch.testing.assert_close(next(r for r in records if r.name == ca).weights, by_hand, atol=1e-5, rtol=1e-4)


def test_xcit_channel_and_class_attention_by_hand() -> None:
    b = _get("xcit")
    xca, ca = "blocks.1.attn", "cls_attn_blocks.0.attn"
    _, records, seen = _record_with_inputs(b, [xca, ca])
    attn = b.model.get_submodule(xca)
    x = seen[xca][0][0]  # (B, N, C): the patches only
    h = attn.num_heads
    with torch.no_grad():
        qkv = attn.qkv(x).reshape(x.shape[0], x.shape[1], 3, h, -1)
        q = F.normalize(qkv[:, :, 0].permute(0, 2, 3, 1), dim=-1)  # (B, h, d, N), unit length over tokens
        k = F.normalize(qkv[:, :, 1].permute(0, 2, 3, 1), dim=-1)
        by_hand = torch.softmax(q @ k.transpose(-2, -1) * attn.temperature, dim=-1)  # (B, h, d, d)
    rec = next(r for r in records if r.name == xca)
    assert rec.token_attention is False
    torch.testing.assert_close(rec.weights, by_hand, atol=1e-5, rtol=1e-4)

    cls_attn = b.model.get_submodule(ca)
    u = seen[ca][0][0]  # (B, 1 + N, C)
    with torch.no_grad():
        q = cls_attn.q(u[:, :1]).reshape(u.shape[0], 1, h, -1).transpose(1, 2)  # (B, h, 1, hd)
        k = cls_attn.k(u).reshape(u.shape[0], u.shape[1], h, -1).transpose(1, 2)  # (B, h, 1+N, hd)
        by_hand = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    torch.testing.assert_close(next(r for r in records if r.name == ca).weights, by_hand, atol=1e-5, rtol=1e-4)


def test_convit_gated_positional_attention_by_hand() -> None:
    b = _get("convit")
    name = "blocks.1.attn"
    _, records, seen = _record_with_inputs(b, [name])
    attn = b.model.get_submodule(name)
    x = seen[name][0][0]  # (B, N, D): the patches only
    gh, gw = b.model.patch_embed.grid_size
    assert x.shape[1] == gh * gw
    h = attn.num_heads
    rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
    dx = (cols[None, :] - cols[:, None]).float()  # (N, N): key column minus query column
    dy = (rows[None, :] - rows[:, None]).float()
    offsets = torch.stack([dx, dy, dx**2 + dy**2], dim=-1)  # (N, N, 3)
    with torch.no_grad():
        qk = attn.qk(x).reshape(x.shape[0], x.shape[1], 2, h, -1)
        q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)  # (B, h, N, hd)
        content = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, N, N)
        position = torch.softmax((offsets @ attn.pos_proj.weight.T + attn.pos_proj.bias).permute(2, 0, 1), dim=-1)
        gate = torch.sigmoid(attn.gating_param).view(1, h, 1, 1)
        mix = (1 - gate) * content + gate * position  # (B, h, N, N)
        by_hand = mix / mix.sum(-1, keepdim=True)
    recorded = next(r for r in records if r.name == name).weights
    torch.testing.assert_close(recorded, by_hand, atol=1e-5, rtol=1e-4)
    assert (recorded - content).abs().max() > 1e-3 and (recorded - position).abs().max() > 1e-3

    mhsa = "blocks.2.attn"  # after the class token joined: plain softmax over [class, patches]
    rec = next(r for r in records if r.name == mhsa)
    assert rec.weights.shape[-1] == 1 + gh * gw


# --- 5: the model is left as it was ----------------------------------------------------------------------------

_MISSING = object()


def _snapshot(model: nn.Module) -> tuple[list, dict[str, torch.Tensor]]:
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
              m.__dict__.get("fused_attn", _MISSING)) for m in model.modules()]
    return hooks, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, before: tuple[list, dict[str, torch.Tensor]]) -> None:
    hooks, state = _snapshot(model)
    assert hooks == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    for m in _attention_modules(model):
        assert not m.attn_drop._forward_hooks and not m.attn_drop._forward_pre_hooks


def test_model_left_as_it_was(built: Built) -> None:
    model = built.model
    fused = [m for m in _attention_modules(model) if hasattr(m, "fused_attn")]
    original = [m.__dict__.get("fused_attn", _MISSING) for m in fused]
    for i, m in enumerate(fused):  # timm sets an instance value; both values must come back as they were
        m.fused_attn = i % 2 == 0
    try:
        before = _snapshot(model)
        adapter = adapter_for(model)
        with adapter.recording(built.side, built.side) as rec:
            assert all(m.fused_attn is False for m in fused)  # the explicit path, while recording
            model(built.x).sum().backward()  # with gradients, as grad-rollout and chefer record
        assert rec.records and all(r.weights.requires_grad for r in rec.records)
        model.zero_grad(set_to_none=True)
        _assert_same(model, before)
        assert [m.__dict__.get("fused_attn") for m in fused] == [i % 2 == 0 for i in range(len(fused))]

        with pytest.raises(RuntimeError, match="boom"), adapter.recording(built.side, built.side):
            model(built.x)
            raise RuntimeError("boom")
        _assert_same(model, before)
    finally:
        for m, value in zip(fused, original, strict=True):
            if value is _MISSING:
                m.__dict__.pop("fused_attn", None)
            else:
                m.fused_attn = value


# --- 6: refusals -------------------------------------------------------------------------------------------------

def test_refusals(built: Built) -> None:
    adapter = adapter_for(built.model)
    for method in METHODS:
        why = adapter.refusal(method)
        if built.cls is TimmXcit and method in TOKEN_METHODS:
            assert isinstance(why, str) and "channels, not tokens" in why and "gradcam" in why and method in why
        else:
            assert why is None, (method, why)


# --- tokens, readout, Grad-CAM, Fig. 7 ---------------------------------------------------------------------------

def test_readout_reproduces_the_head(built: Built) -> None:
    """The readout weights over the final tokens, put through the rest of the head, give the logits."""
    model, adapter = built.model, adapter_for(built.model)
    tokens = adapter.final_tokens(built.side, built.side)
    v = adapter.readout(tokens)
    assert v.shape == (tokens.n,) and torch.isclose(v.sum(), torch.tensor(1.0))
    expected_kind = {"eva02": "mean", "eva-rope-reg": "mean", "beit": "mean"}.get(built.key, "token")
    assert adapter.readout_kind() == expected_kind
    with torch.no_grad():
        feats = model.forward_features(built.x)  # (B, N, D)
        pooled = torch.einsum("n,bnd->bd", v, feats)  # (B, D)
        logits = model.head(getattr(model, "fc_norm", nn.Identity())(pooled))
    torch.testing.assert_close(logits, built.logits, atol=1e-5, rtol=1e-4)


def test_wrong_input_size_is_refused_with_the_size_the_model_takes(built: Built) -> None:
    adapter = adapter_for(built.model)
    if built.cls is TimmXcit:
        with pytest.raises(ExplainError, match="multiples of 16"):
            adapter.final_tokens(40, 40)
        tokens = adapter.final_tokens(32, 64)  # any multiple: the stem is convolutional
        assert tokens.grid == (2, 4) and tokens.prefix == 1
        with torch.no_grad():
            _, rec = adapter.record_forward(torch.randn(1, 3, 32, 64))
        assert rec.records[-1].weights.shape == (1, adapter.heads(), 1, 9)
        return
    wrong = built.side + 16
    with pytest.raises(ExplainError, match=f"{built.side}x{built.side}"):
        adapter.final_tokens(wrong, wrong)
    with pytest.raises(ExplainError), adapter.recording(wrong, wrong):
        pass


def _attention_input_module(b: Built, index: int) -> nn.Module:
    """The norm whose output enters attention in layer ``index`` (counting as the records do)."""
    m = b.model
    later = {TimmCait: "blocks_token_only", TimmXcit: "cls_attn_blocks"}.get(b.cls)
    blocks = list(m.blocks) + (list(getattr(m, later)) if later else [])
    return blocks[index].norm1


def test_gradcam_feature_maps(built: Built) -> None:
    """Each layer's map is its norm1 output (the tokens entering attention); with no layer, a class-token
    readout reads the last such layer, a pooled one the final norm (what forward_features returns)."""
    model, adapter = built.model, adapter_for(built.model)
    tokens = adapter.final_tokens(built.side, built.side)
    for layer in [None, *range(adapter.depth()), -1]:
        pooled_default = layer is None and adapter.readout_kind() == "mean"
        index = adapter.depth() - 1 if layer is None or layer == -1 else layer
        seen: list[torch.Tensor] = []
        handle = _attention_input_module(built, index).register_forward_hook(
            lambda _m, _i, o, seen=seen: seen.append(o))
        try:
            cam = adapter.cam_forward(built.x, layer)
        finally:
            handle.remove()
        torch.testing.assert_close(cam.logits.detach(), built.logits, atol=1e-5, rtol=1e-4)
        if pooled_default:
            with torch.no_grad():
                expected = model.forward_features(built.x)  # (B, N, D)
        else:
            (expected,) = seen
        torch.testing.assert_close(cam.activations.detach(), expected.detach())
        fmap = cam.reshape(cam.activations)  # (B, D, gh, gw)
        assert fmap.shape == (2, model.embed_dim, *tokens.grid)
        torch.testing.assert_close(fmap[:, :, -1, -1], cam.activations[:, -1])  # the last token is the last cell
        assert cam.cell == tokens.cell
        if layer is None:
            (grad,) = torch.autograd.grad(cam.logits[:, 0].sum(), cam.activations)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ExplainError, match="out of range"):
        adapter.cam_forward(built.x, adapter.depth())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_patch_and_position_embeddings(built: Built) -> None:
    model, adapter = built.model, adapter_for(built.model)
    w = adapter.patch_embedding_weight()
    if built.cls is TimmXcit:
        assert w is None  # a stack of 3x3 stride-2 convolutions, not a patch projection
    else:
        p = model.patch_embed.patch_size
        assert w is model.patch_embed.proj.weight and w.shape == (model.embed_dim, 3, *p)
    pos = adapter.position_embedding()
    expected_prefix = {"eva02": 1, "cait": 0, "xcit": 0, "convit": 0}
    if built.key not in expected_prefix:  # rotary or relative positions only
        assert pos is None
        return
    table, grid, prefix = pos
    assert prefix == expected_prefix[built.key]
    assert grid == adapter.final_tokens(built.side, built.side).grid
    assert table.shape == (1, prefix + grid[0] * grid[1], model.embed_dim)
    if built.cls is TimmXcit:  # the Fourier encoding the model adds to its patches
        with torch.no_grad():
            added = model.pos_embed(1, *grid).flatten(2).transpose(1, 2)
        torch.testing.assert_close(table, added)
    else:
        assert table is model.pos_embed


def test_eva_position_embedding_without_class_rows() -> None:
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, num_classes=3,
                              no_embed_class=True, num_reg_tokens=2).eval()
    adapter = adapter_for(model)
    table, grid, prefix = adapter.position_embedding()
    assert prefix == 0 and grid == (2, 2) and table.shape[1] == 4
    assert adapter.final_tokens(28, 28).prefix == 3  # class token and two registers
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 28, 28)).shape[1] == 3 + 4


@pytest.mark.parametrize("pool", ["max", "avgmax", "map"])
def test_eva_image_dependent_readouts(pool: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, num_classes=3,
                              global_pool=pool).eval()
    adapter = adapter_for(model)
    tokens = adapter.final_tokens(28, 28)
    with pytest.raises(ExplainError, match="record a forward pass"):
        adapter.readout(tokens)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        _, rec = adapter.record_forward(x)
        feats = model.forward_features(x)  # (B, N, D)
    r = adapter.readout(tokens, rec)  # (B, N)
    assert r.shape == (2, tokens.n)
    torch.testing.assert_close(r.sum(-1), torch.ones(2))
    if pool == "map":
        assert adapter.readout_kind() == "pool" and (r >= 0).all() and not torch.allclose(r[0], r[1])
        return
    grid = feats[:, tokens.prefix:]  # (B, P, D)
    wins = F.one_hot(grid.argmax(dim=1), grid.shape[1]).float().mean(dim=1)  # (B, P): share of channels won
    expected = wins if pool == "max" else 0.5 * wins + 0.5 / grid.shape[1]
    assert (r[:, :tokens.prefix] == 0).all()
    torch.testing.assert_close(r[:, tokens.prefix:], expected)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_convit_whose_class_token_never_joins(pool: str) -> None:
    """Every block GPSA: no class token joins, yet timm's head reads token 0 (a patch) or skips it in the mean."""
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, img_size=32, patch_size=8, depth=2, local_up_to_layer=2,
                              embed_dim=8, num_heads=4, num_classes=3, global_pool=pool).eval()
    adapter = adapter_for(model)
    tokens = adapter.final_tokens(32, 32)
    assert tokens.prefix == 0 and tokens.n == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, rec = adapter.record_forward(x)
        feats = model.forward_features(x)  # (B, 16, D)
    assert all(r.q_index is None and r.queries == tokens for r in rec.records)
    pooled = torch.einsum("n,bnd->bd", adapter.readout(tokens), feats)
    torch.testing.assert_close(model.head(pooled), logits, atol=1e-5, rtol=1e-4)


# --- explain() end to end ----------------------------------------------------------------------------------------

def test_explain_every_method_gives_a_map_or_a_reason(built: Built) -> None:
    from vitviz.explain import explain

    adapter = adapter_for(built.model)
    for method in METHODS:
        refused = adapter.refusal(method)
        if refused is not None:
            with pytest.raises(ExplainError, match="channels, not tokens"):
                explain(built.model, built.x, method=method)
            continue
        maps = explain(built.model, built.x, method=method)
        assert maps.shape == (2, built.side, built.side), method
        assert torch.isfinite(maps).all(), method
        spread = maps.flatten(1).amax(1) - maps.flatten(1).amin(1)
        assert (spread > 0).all(), (built.key, method, spread)
