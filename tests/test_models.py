"""Models: presets build and run, timm parity both ways, attention paths, pooling, positions, bad input."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import vitviz
from vitviz.config import ViTConfig
from vitviz.errors import ConfigError, WeightsUnavailableError
from vitviz.models import VisionTransformer, build_model, from_timm, list_models, to_timm
from vitviz.models.layers import resample_pos_embed, set_training_attention

SMALL = {"vit": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5),
         "hybrid": dict(img_size=64, embed_dim=32, depth=1, num_heads=2, num_classes=5, backbone_width=8),
         "resnet": dict(img_size=32, width=8, num_classes=5)}


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Non-trivial values in every parameter and buffer (timm zero-inits heads, BN stats start at 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * scale)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("name", list_models())
def test_every_preset_builds_and_runs_small(name: str) -> None:
    family = vitviz.models.PRESETS[name][0]
    model = vitviz.create_model(name, **SMALL[family]).eval()
    size = SMALL[family]["img_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 5)
    assert model.family == family
    assert torch.isfinite(out).all()


def test_presets_have_their_documented_shapes() -> None:
    base = vitviz.create_model("vit_base_patch16_224")
    assert base.grid_size == (14, 14) and base.pos_embed.shape == (1, 197, 768)
    assert sum(p.numel() for p in base.parameters()) == pytest.approx(86.6e6, rel=0.01)  # ViT-B/16: 86M
    r50 = vitviz.create_model("resnet50")
    assert sum(p.numel() for p in r50.parameters()) == pytest.approx(25.6e6, rel=0.01)  # ResNet-50: 25.6M


TIMM_CASES = [
    ("vit_base_patch16_224", {}, 224),
    ("vit_small_patch16_224", dict(img_size=96, global_pool="avg", num_classes=7), 96),
    ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, num_classes=3), 64),
    ("resnet18", {}, 64),
    ("resnet34", dict(num_classes=4), 64),
    ("resnet50", {}, 64),
    ("vit_small_r26_s32_224", dict(num_classes=6), 224),
    ("vit_base_r50_s16_224", dict(depth=2, num_classes=6), 224),
]


@pytest.mark.parametrize(("name", "kwargs", "size"), TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_parity_both_ways(name: str, kwargs: dict, size: int) -> None:
    torch.manual_seed(0)
    theirs = randomize(timm.create_model(name, pretrained=False, **kwargs)).eval()
    ours = from_timm(theirs)
    assert not ours.training
    assert type(ours).__module__.startswith("vitviz.models")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = theirs(x)
        assert rel_err(expected, ours(x)) < 1e-4
        back = to_timm(ours).eval()
        assert rel_err(expected, back(x)) < 1e-4


def test_from_timm_refuses_what_we_do_not_implement() -> None:
    # register tokens and layer scale convert now (tests/test_timm_models.py); these still do not
    with pytest.raises(ConfigError, match="no class token"):
        from_timm(timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", img_size=32,
                                    patch_size=8))
    with pytest.raises(ConfigError, match="qk-norm"):
        from_timm(timm.create_model("vit_tiny_patch16_224", qk_norm=True, img_size=32, patch_size=8))
    with pytest.raises(ConfigError, match="converts timm's VisionTransformer"):
        from_timm(timm.create_model("mobilenetv3_small_050"))


def test_small_stem_resnet_has_no_timm_equivalent() -> None:
    with pytest.raises(ConfigError, match="small-image stem"):
        to_timm(vitviz.create_model("resnet18_32"))


def test_fused_and_explicit_attention_agree() -> None:
    model = randomize(vitviz.create_model("vit_p4_d8_32", depth=3, embed_dim=48, num_heads=4)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        explicit, attentions = model(x, return_attention=True)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    assert len(attentions) == 3
    for a in attentions:
        assert a.shape == (3, 4, 65, 65)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 65))


@pytest.mark.parametrize(("path", "fused_calls"), [("auto", False), ("explicit", False), ("fused", True)])
def test_training_attention_paths_train_the_same_model(path: str, fused_calls: bool, request) -> None:
    # Training on CPU defaults to the explicit path (faster there); every path must train the same model.
    model = randomize(vitviz.create_model("vit_p4_d8_32", depth=2, embed_dim=48, num_heads=4)).train()
    x = torch.randn(4, 3, 32, 32)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    set_training_attention(model, path)
    calls = request.getfixturevalue("fused_attention_calls")  # counting from here on
    loss, grads = loss_and_grads()
    assert bool(calls) is fused_calls  # the setting picks the path
    with torch.no_grad():
        reference = model.eval()(x)  # eval: always the fused kernel
    model.train()
    torch.testing.assert_close(loss, reference.square().mean(), rtol=1e-5, atol=1e-6)
    set_training_attention(model, "explicit" if fused_calls else "fused")
    _, other = loss_and_grads()
    for g, h in zip(grads, other, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def test_unknown_training_attention_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown attention path 'flash'.*auto, fused, explicit"):
        set_training_attention(vitviz.create_model("vit_p8_d8_32", depth=1), "flash")


def test_attention_weights_are_differentiable() -> None:
    model = vitviz.create_model("vit_p8_d8_32", depth=2, embed_dim=32, num_heads=2)
    randomize(model)
    logits, attentions = model(torch.randn(1, 3, 32, 32), return_attention=True)
    grads = torch.autograd.grad(logits[0, 1], attentions)
    assert all(g.shape == a.shape and g.abs().sum() > 0 for g, a in zip(grads, attentions, strict=True))


def test_mean_pooling_is_the_normalised_patch_mean() -> None:
    token = randomize(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                  num_classes=3))).eval()
    mean = randomize(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                 num_classes=3, pooling="mean"))).eval()
    assert isinstance(mean.norm, torch.nn.Identity) and isinstance(mean.fc_norm, torch.nn.LayerNorm)
    assert isinstance(token.norm, torch.nn.LayerNorm) and isinstance(token.fc_norm, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = mean.forward_features(x)  # (B, 1+N, D)
        manual = mean.head(mean.fc_norm(tokens[:, 1:].mean(1)))
        torch.testing.assert_close(mean(x), manual)
        feats = token.forward_features(x)
        torch.testing.assert_close(token(x), token.head(feats[:, 0]))


def test_position_embedding_resampling_matches_timm_and_runs_other_sizes() -> None:
    pos = torch.randn(1, 1 + 8 * 8, 16)
    ours = resample_pos_embed(pos, (8, 8), (12, 12), 1)
    theirs = resample_abs_pos_embed(pos, new_size=[12, 12], old_size=[8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(ours, theirs)
    assert resample_pos_embed(pos, (8, 8), (8, 8)) is pos

    timm_fixed = randomize(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=3)).eval()
    timm_dynamic = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=3,
                                     dynamic_img_size=True).eval()
    timm_dynamic.load_state_dict(timm_fixed.state_dict())
    model = from_timm(timm_fixed)
    x = torch.randn(2, 3, 48, 48)
    assert model.patch_grid(48, 48) == (12, 12)
    with torch.no_grad():
        assert rel_err(timm_dynamic(x), model(x)) < 1e-4


def test_stochastic_depth_and_dropout_only_in_training() -> None:
    model = randomize(vitviz.create_model("vit_p8_d8_32", depth=4, embed_dim=32, num_heads=2, drop_path=0.5))
    x = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_hybrid_tokens_come_from_the_backbone_feature_map() -> None:
    model = vitviz.create_model("hybrid_r18_vit_32", depth=1, embed_dim=32, num_heads=2, backbone_width=8).eval()
    assert model.grid_size == (8, 8)  # 32 px / stride 4
    assert model.patch_embed.reduction == 4
    feats = model.patch_embed.features(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 32, 8, 8)  # width 8 * 2**2 channels after three basic stages
    assert model.pos_embed.shape == (1, 65, 32)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("vit_giant", {}, "unknown model"),
        ("vit_p4_d8_32", dict(img_size=30), "not divisible by patch_size"),
        ("vit_p4_d8_32", dict(embed_dim=100, num_heads=3), "not divisible by num_heads"),
        ("vit_p4_d8_32", dict(pooling="max"), "pooling must be one of"),
        ("vit_p4_d8_32", dict(depth=0), "depth must be a positive integer"),
        ("resnet18", dict(patch_size=4), "no setting patch_size"),
        ("hybrid_r18_vit_32", dict(img_size=30), "does not tile"),
        ("vit_p4_d8_32", dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_create_model_arguments(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        vitviz.create_model(name, **overrides)


def test_presets_have_no_pretrained_weights() -> None:
    with pytest.raises(ConfigError, match="trained from scratch"):
        vitviz.create_model("vit_p4_d8_32", pretrained=True)


def test_timm_pretrained_from_a_file(tmp_path) -> None:
    source = randomize(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4)).eval()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    model = vitviz.create_model("timm:vit_tiny_patch16_224", pretrained_file=weights, img_size=32, patch_size=8,
                                num_classes=4)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(source(x), model(x)) < 1e-4

    wrong = tmp_path / "wrong.safetensors"
    save_file({"nope": torch.zeros(1)}, str(wrong))
    with pytest.raises(WeightsUnavailableError, match="do not fit"):
        vitviz.create_model("timm:vit_tiny_patch16_224", pretrained_file=wrong, img_size=32, patch_size=8)
    pickled = tmp_path / "model.pth"
    torch.save(source.state_dict(), pickled)
    with pytest.raises(WeightsUnavailableError, match="never unpickles"):
        vitviz.create_model("timm:vit_tiny_patch16_224", pretrained_file=pickled)


def test_timm_pretrained_offline_says_how_to_supply_weights(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="pretrained_file"):
        vitviz.create_model("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True)
    with pytest.raises(ConfigError, match="unknown timm model"):
        vitviz.create_model("timm:not_a_model")


def test_build_model_rebuilds_from_a_config_dict() -> None:
    from vitviz.config import config_to_dict

    model = vitviz.create_model("hybrid_r18_vit_32", depth=1, embed_dim=32, num_heads=2, backbone_width=8)
    again = build_model("hybrid", config_to_dict(model.config))
    assert again.config == model.config
    assert again.state_dict().keys() == model.state_dict().keys()
