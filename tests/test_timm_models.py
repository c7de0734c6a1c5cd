"""timm models a user brings: what converts (DeiT-III, DINOv2 with registers), what is refused and named,
``timm:<name>`` returning timm's own model otherwise, and pretrained weights from a file, the cache or nowhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from test_models import randomize as randomize_all
from torch import nn

import vitviz
from vitviz.checkpoint import load_checkpoint, read_checkpoint_meta, read_safetensors, save_checkpoint
from vitviz.config import ViTConfig
from vitviz.errors import ConfigError, VitvizError, WeightsUnavailableError
from vitviz.models import VisionTransformer, from_timm, timm_config, to_timm
from vitviz.models import pretrained as pt

CHECKPOINTS = sorted((Path(__file__).parent.parent / "checkpoints").glob("*.safetensors"))
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere: timm zero-inits heads, layer scale starts at 1e-6, positions near 0."""
    return randomize_all(model, seed, scale=0.1)


def assert_same_logits(theirs: nn.Module, ours: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert expected.abs().max() > 1e-3  # a test on all-zero logits would prove nothing
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_weights(model: nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# what converts


def test_deit3_converts_with_layer_scale_and_class_free_positions() -> None:
    theirs = randomize(timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=32, depth=2,
                                         num_classes=5)).eval()
    assert theirs.no_embed_class and not isinstance(theirs.blocks[0].ls1, nn.Identity)  # what makes it DeiT-III
    ours = from_timm(theirs)
    assert isinstance(ours, VisionTransformer) and not ours.training
    assert ours.config.init_values == theirs.blocks[0].ls1.init_values and ours.config.reg_tokens == 0
    assert torch.equal(ours.blocks[1].ls2.gamma, theirs.blocks[1].ls2.gamma)
    assert torch.equal(ours.pos_embed[:, 1:], theirs.pos_embed) and not ours.pos_embed[:, :1].any()
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(theirs, ours, x)
    assert_same_logits(theirs, to_timm(ours).eval(), x)  # back to timm (positions with a class entry)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_dinov2_with_registers_converts(pool: str) -> None:
    theirs = randomize(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=2,
                                         embed_dim=48, num_heads=3, num_classes=6, global_pool=pool)).eval()
    ours = from_timm(theirs)
    regs = theirs.num_reg_tokens
    assert regs > 0 and ours.config.reg_tokens == regs and ours.num_prefix_tokens == theirs.num_prefix_tokens
    assert ours.config.pooling == ("mean" if pool == "avg" else "token")
    assert torch.equal(ours.reg_token, theirs.reg_token)
    x = torch.randn(2, 3, 56, 56)
    assert_same_logits(theirs, ours, x)
    assert_same_logits(theirs, to_timm(ours).eval(), x)


def test_dinov2_dynamic_image_size_matches_ours_at_other_sizes() -> None:
    # timm resamples positions per input when dynamic_img_size is set; ours always does, the same way
    theirs = randomize(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=2,
                                         embed_dim=48, num_heads=3, num_classes=4, dynamic_img_size=True)).eval()
    ours = from_timm(theirs)
    assert_same_logits(theirs, ours, torch.randn(1, 3, 84, 70))


def test_register_tokens_keep_the_attention_contract() -> None:
    model = randomize(VisionTransformer(ViTConfig(**TINY, num_classes=3, reg_tokens=3, init_values=1e-3,
                                                  pooling="mean"))).eval()
    assert model.num_prefix_tokens == 4 and model.pos_embed.shape[1] == 4 + 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, attentions = model(x, return_attention=True)
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
        tokens = model.forward_features(x)  # (B, 4 + 16, D)
        manual = model.head(model.fc_norm(tokens[:, 4:].mean(1)))  # mean pooling skips class and registers
    assert [a.shape for a in attentions] == [(2, 2, 20, 20)] * 2
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(2, 2, 20))
    torch.testing.assert_close(logits, manual)


def test_new_fields_round_trip_through_checkpoints(tmp_path: Path) -> None:
    model = randomize(vitviz.create_model("vit_p8_d8_32", depth=2, embed_dim=32, num_heads=2, reg_tokens=2,
                                          init_values=1e-4)).eval()
    assert {"reg_token", "blocks.0.ls1.gamma", "blocks.1.ls2.gamma"} <= set(model.state_dict())
    path = save_checkpoint(model, tmp_path / "reg.safetensors")
    loaded, meta = load_checkpoint(path)
    assert loaded.config == model.config and meta.model_config["reg_tokens"] == 2
    assert tensors_equal(loaded.state_dict(), model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("path", CHECKPOINTS, ids=[p.stem for p in CHECKPOINTS])
def test_saved_checkpoints_load_bit_for_bit(path: Path) -> None:
    meta = read_checkpoint_meta(path)
    vit_cfg = meta.model_config.get("vit", meta.model_config)
    assert "reg_tokens" not in vit_cfg  # written before the new fields: they take their defaults
    model, _ = load_checkpoint(path)  # strict: no new parameter appears in a default model
    tensors, _ = read_safetensors(path)
    assert tensors_equal(model.state_dict(), tensors)
    assert getattr(model, "num_prefix_tokens", 1) == 1


@pytest.mark.parametrize(("field", "value"), [("reg_tokens", -1), ("reg_tokens", 1.5), ("init_values", 0.0),
                                              ("init_values", float("nan")), ("init_values", True)])
def test_bad_new_fields_are_config_errors(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        ViTConfig(**{field: value})


# ---------------------------------------------------------------------------------------------
# what is refused, by name


REFUSED = [
    ("deit_tiny_distilled_patch16_224", dict(TINY), "distillation token"),
    ("vit_base_patch16_rpn_224", dict(TINY), "ResPostBlock"),
    ("vit_small_patch16_18x2_224", dict(TINY), "ParallelThingsBlock"),
    ("vit_base_patch16_xp_224", dict(TINY), "ParallelScalingBlock"),
    ("vit_tiny_patch16_224", dict(TINY, class_token=False, global_pool="avg"), "no class token"),
    ("vit_tiny_patch16_224", dict(TINY, qk_norm=True), "qk-norm"),
    ("vit_tiny_patch16_224", dict(TINY, pre_norm=True), "pre_norm"),
    ("vit_tiny_patch16_224", dict(TINY, dynamic_img_size=True, dynamic_img_pad=True), "dynamic_img_pad"),
    ("vit_tiny_patch16_224", dict(TINY, global_pool="map"), "global_pool='map'"),
    ("resnetblur18", {}, "stem pool"),
    ("mobilenetv3_small_050", {}, "not MobileNetV3"),
]


@pytest.mark.parametrize(("name", "kwargs", "feature"), REFUSED, ids=[f"{n}-{f}" for n, _, f in REFUSED])
def test_refusals_name_the_feature(name: str, kwargs: dict, feature: str) -> None:
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(ConfigError, match=feature):  # never a raw RuntimeError / AttributeError
        from_timm(model)


@pytest.mark.parametrize("name", [
    "vit_base_patch16_clip_224", "vit_base_patch16_siglip_224", "vit_giant_patch14_dinov2",
    "vit_dpwee_patch16_reg1_gap_256", "vit_medium_patch16_gap_256", "vit_so400m_patch14_reg1_tipsv2", "resnet50d",
    "resnext50_32x4d", "seresnet50", "wide_resnet50_2", "resnet50_gn", "vit_base_r50_s16_224",
    "deit3_huge_patch14_224", "vit_base_patch16_xp_224",
])
def test_reading_any_timm_architecture_never_crashes(name: str) -> None:
    model = timm.create_model(name, pretrained=False, device="meta")  # shapes only: fast even for giants
    try:
        timm_config(model)
    except ConfigError as err:
        assert "does not implement" in str(err)


# ---------------------------------------------------------------------------------------------
# timm:<name>


def test_timm_name_returns_timm_model_unchanged_when_it_does_not_convert() -> None:
    torch.manual_seed(3)
    got = vitviz.create_model("timm:test_convnext", pretrained=False)
    torch.manual_seed(3)
    reference = timm.create_model("test_convnext", pretrained=False)
    assert type(got) is type(reference) and not got.training
    assert tensors_equal(got.state_dict(), reference.state_dict())
    with pytest.raises(ConfigError, match="does not convert.*ConvNeXt"):
        vitviz.create_model("timm:test_convnext", convert=True)


def test_convert_switch() -> None:
    ours = vitviz.create_model("timm:deit3_small_patch16_224", img_size=32, depth=1)
    assert isinstance(ours, VisionTransformer) and not ours.training
    theirs = vitviz.create_model("timm:deit3_small_patch16_224", convert=False, img_size=32, depth=1)
    assert type(theirs) is timm.models.vision_transformer.VisionTransformer and not theirs.training
    with pytest.raises(ConfigError, match="convert=False"):
        vitviz.create_model("vit_p4_d8_32", convert=False)


def test_architecture_is_checked_before_any_weight_lookup(monkeypatch) -> None:
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were looked for")

    for fn in ("load_pretrained", "cached_weights", "hub_reachable", "load_weights_file"):
        monkeypatch.setattr(pt, fn, no_weights)
    with pytest.raises(ConfigError, match=r"unknown timm model 'no_such_net'.*timm\.list_models"):
        vitviz.create_model("timm:no_such_net", pretrained=True)
    with pytest.raises(ConfigError, match=r"no pretrained tag 'bogus'.*augreg2_in21k_ft_in1k"):
        vitviz.create_model("timm:vit_base_patch16_224.bogus", pretrained=True)
    with pytest.raises(ConfigError, match="does not convert"):
        vitviz.create_model("timm:test_convnext.r160_in1k", pretrained=True, convert=True)
    with pytest.raises(ConfigError, match="cannot build"):
        vitviz.create_model("timm:test_vit", pretrained=True, no_such_argument=1)


# ---------------------------------------------------------------------------------------------
# weights


def test_pretrained_file_fills_converted_and_unconverted_models(tmp_path: Path) -> None:
    source = randomize(timm.create_model("deit3_small_patch16_224", img_size=32, depth=2, num_classes=4)).eval()
    weights = save_weights(source, tmp_path / "d.safetensors")
    model = vitviz.create_model("timm:deit3_small_patch16_224", pretrained_file=weights, img_size=32, depth=2,
                                num_classes=4)
    assert isinstance(model, VisionTransformer)
    assert_same_logits(source, model, torch.randn(2, 3, 32, 32))

    conv = randomize(timm.create_model("test_convnext"), seed=1)
    got = vitviz.create_model("timm:test_convnext", pretrained_file=save_weights(conv, tmp_path / "c.safetensors"))
    assert type(got) is type(conv) and tensors_equal(got.state_dict(), conv.state_dict())


def fake_hub_cache(root: Path, repo: str, model: nn.Module) -> Path:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/model.safetensors}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    (folder / "snapshots" / rev).mkdir(parents=True)
    return save_weights(model, folder / "snapshots" / rev / "model.safetensors")


@pytest.mark.parametrize("name", ["test_vit.r160_in1k", "test_convnext.r160_in1k"])
def test_weights_come_from_the_local_hub_cache(tmp_path: Path, monkeypatch, name: str) -> None:
    source = randomize(timm.create_model(name.split(".")[0]), seed=2).eval()
    fake_hub_cache(tmp_path / "hub", pt.hub_id(name), source)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(pt, "hub_reachable", lambda *a, **k: pytest.fail("the cache should have been enough"))
    model = vitviz.create_model(f"timm:{name}", pretrained=True)
    assert isinstance(model, VisionTransformer) == (name.startswith("test_vit"))
    assert_same_logits(source, model, torch.randn(1, 3, 64, 64))
    # as after a download, timm adapts the weights to other arguments: a new head for other classes
    other = vitviz.create_model(f"timm:{name}", pretrained=True, num_classes=7)
    state, kept = other.state_dict(), source.state_dict()
    head = timm.get_pretrained_cfg(name).classifier  # "head" or "head.fc"
    assert state[f"{head}.weight"].shape[0] == 7
    assert all(torch.equal(state[k], kept[k]) for k in state if not k.startswith(f"{head}."))


def test_download_goes_through_timm_after_telling_progress(tmp_path: Path, monkeypatch) -> None:
    name = "test_vit.r160_in1k"
    source = randomize(timm.create_model("test_vit"), seed=4).eval()
    weights = save_weights(source, tmp_path / "w.safetensors")
    create = timm.create_model
    events: list[str] = []

    def fake_download(model_name: str, pretrained: bool = False, **kwargs):  # timm's loader, minus the network
        if not pretrained:
            return create(model_name, **kwargs)
        events.append(f"download {kwargs.pop('cache_dir')}")
        model = create(model_name, **kwargs)
        model.load_state_dict(load_file(weights))
        return model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(pt, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(timm, "create_model", fake_download)
    model = vitviz.create_model(f"timm:{name}", pretrained=True, progress=lambda msg: events.append(msg))
    assert len(events) == 2 and name in events[0] and pt.hub_id(name) in events[0]  # told before it started
    assert events[1] == f"download {tmp_path / 'empty'}"  # into the cache we look in
    assert_same_logits(source, model, torch.randn(1, 3, 64, 64))


def test_offline_error_names_the_hub_page_in_the_users_words(tmp_path: Path, monkeypatch) -> None:
    name = "deit3_small_patch16_224.fb_in1k"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(pt, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(WeightsUnavailableError) as info:
        vitviz.create_model(f"timm:{name}", pretrained=True, depth=1)
    err = info.value
    assert isinstance(err, VitvizError) and err.model_name == name and err.hub_id == pt.hub_id(name)
    page = f"https://huggingface.co/{err.hub_id}"
    assert page in str(err) and "model.safetensors" in str(err) and "pretrained_file=PATH" in str(err)
    wording = {"api": "pretrained_file=PATH", "cli": "--pretrained-file PATH", "dashboard": '"Weights file" field'}
    for where, words in wording.items():
        advice = pt.weights_advice(name, where)
        assert page in advice and "model.safetensors" in advice and words in advice
        assert all(w not in advice for other, w in wording.items() if other != where)
    with pytest.raises(ConfigError, match="where must be"):
        pt.weights_advice(name, "email")


def test_models_without_hub_weights_say_so(monkeypatch) -> None:
    monkeypatch.setattr(pt, "hub_reachable", lambda *a, **k: pytest.fail("nothing to download"))
    with pytest.raises(WeightsUnavailableError, match="no pretrained weights"):
        vitviz.create_model("timm:vit_base_patch16_xp_224", pretrained=True, **TINY)


# ---------------------------------------------------------------------------------------------
# the curated list and hub ids


def test_curated_names_exist_with_their_tags_and_hub_ids() -> None:
    available = set(timm.list_pretrained())
    assert len(pt.CURATED) >= 8
    for name, description in pt.CURATED.items():
        assert name in available, name
        assert "." in name and description and "\n" not in description
        assert pt.hub_id(name) == f"timm/{name}"  # timm's repositories are named after model and tag


def test_hub_id_of_a_bare_name_is_the_default_tags() -> None:
    default = timm.get_pretrained_cfg("vit_small_patch14_reg4_dinov2")
    full = f"vit_small_patch14_reg4_dinov2.{default.tag}"
    assert full in timm.list_pretrained()
    assert pt.hub_id("vit_small_patch14_reg4_dinov2") == pt.hub_id(full) == f"timm/{full}"
    with pytest.raises(ConfigError, match="unknown timm model"):
        pt.hub_id("not_a_model")


def test_curated_transformers_that_should_convert_do() -> None:
    expected = {"vit_base_patch16_224.augreg2_in21k_ft_in1k": "vit", "deit3_base_patch16_224.fb_in22k_ft_in1k": "vit",
                "vit_small_patch14_reg4_dinov2.lvd142m": "vit", "resnet50.a1_in1k": "resnet",
                "swin_tiny_patch4_window7_224.ms_in1k": None, "convnext_tiny.in12k_ft_in1k": None}
    for name, family in expected.items():
        model = timm.create_model(name, pretrained=False, device="meta")
        if family is None:
            with pytest.raises(ConfigError):
                timm_config(model)
        else:
            assert timm_config(model)[0] == family, name
