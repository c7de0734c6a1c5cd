"""Hugging Face image models through ``create_model("hf:<folder>")``: tiny random configs saved into a temporary
folder and loaded back (no network), checked against the models' own eager ``output_attentions``."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from test_adapters_vit import naive_rollout_row

import vitviz
from vitviz.errors import ConfigError, ExplainError, WeightsUnavailableError
from vitviz.explain import adapter_for, capture_attention, explain, explain_details
from vitviz.explain.adapters.hf_common import RECORDING
from vitviz.explain.adapters.hf_swin import HFSwin
from vitviz.explain.adapters.hf_vit import HFViT
from vitviz.models.hf import HFImageModel, hf_advice

VIT_KW = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8)
TEXT_KW = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=20,
               max_position_embeddings=8)


def _with_text(config_cls):
    """A CLIP / SigLIP config built like the vision configs: the vision fields given, a one-layer text side."""
    def make(num_labels: int, **vision):
        return config_cls(vision_config=vision, text_config=TEXT_KW, num_labels=num_labels)

    return make


def _token(out, prefix, n):  # the class token
    w = torch.zeros(out.attentions[0].shape[0], n)
    w[:, 0] = 1
    return w


def _dist(out, prefix, n):  # class and distillation token averaged
    w = torch.zeros(out.attentions[0].shape[0], n)
    w[:, :2] = 0.5
    return w


def _patch_mean(out, prefix, n):
    w = torch.zeros(out.attentions[0].shape[0], n)
    w[:, prefix:] = 1 / (n - prefix)
    return w


def _cls_and_mean(out, prefix, n):  # Dinov2(WithRegisters)ForImageClassification: [class token, patch mean]
    return 0.5 * _token(out, prefix, n) + 0.5 * _patch_mean(out, prefix, n)


def _siglip_pool(model):
    def readout(out, prefix, n):
        head = model.head
        lhs = out.last_hidden_state  # (B, N, D): what the pooling head reads
        _, w = head.attention(head.probe.expand(lhs.shape[0], -1, -1), lhs, lhs, need_weights=True)
        return w[:, 0]

    return readout


# name -> (config class, model class, config overrides, hand-written readout, prefix tokens, has a classifier)
ARCHS = {
    "vit": (T.ViTConfig, T.ViTForImageClassification, {}, _token, 1, True),
    "deit": (T.DeiTConfig, T.DeiTForImageClassificationWithTeacher, {}, _dist, 2, True),
    "deit-plain": (T.DeiTConfig, T.DeiTForImageClassification, {}, _token, 2, True),  # distillation token unread
    "beit": (T.BeitConfig, T.BeitForImageClassification, {}, _patch_mean, 1, True),
    "dinov2": (T.Dinov2Config, T.Dinov2ForImageClassification, {}, _cls_and_mean, 1, True),
    "dinov2-reg": (T.Dinov2WithRegistersConfig, T.Dinov2WithRegistersModel, {"num_register_tokens": 2}, _token, 3,
                   False),
    "dinov2-reg-cls": (T.Dinov2WithRegistersConfig, T.Dinov2WithRegistersForImageClassification,
                       {"num_register_tokens": 2}, _cls_and_mean, 3, True),
    "clip": (T.CLIPVisionConfig, T.CLIPVisionModel, {}, _token, 1, False),
    "clip-proj": (T.CLIPVisionConfig, T.CLIPVisionModelWithProjection, {"projection_dim": 16}, _token, 1, False),
    "siglip": (T.SiglipVisionConfig, T.SiglipVisionModel, {}, None, 0, False),
    # CLIP / SigLIP fine-tunes: the dual encoder's config, a classifier on the tower's mean token
    "clip-cls": (_with_text(T.CLIPConfig), T.CLIPForImageClassification, {}, _patch_mean, 1, True),
    "siglip-cls": (_with_text(T.SiglipConfig), T.SiglipForImageClassification, {}, _patch_mean, 0, True),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Each architecture saved with save_pretrained (random weights, 3 classes where it has a head)."""
    out = {}
    for i, (name, (config_cls, model_cls, extra, *_)) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        folder = tmp_path_factory.mktemp(name)
        model_cls(config_cls(**VIT_KW, **extra, num_labels=3)).save_pretrained(folder)
        out[name] = str(folder)
    torch.manual_seed(9)
    folder = tmp_path_factory.mktemp("swin")
    T.SwinForImageClassification(T.SwinConfig(embed_dim=16, depths=[2, 2], num_heads=[2, 2], image_size=32,
                                              patch_size=4, window_size=4, num_labels=3)).save_pretrained(folder)
    out["swin"] = str(folder)
    return out


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _eager(folder: str):
    """The same folder loaded straight with transformers on its eager path: the reference."""
    config = T.AutoConfig.from_pretrained(folder)
    cls = getattr(T, config.architectures[0])
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", list(ARCHS))
def test_rollout_equals_the_models_own_eager_attentions(folders, x, name):
    *_, readout, prefix, has_head = ARCHS[name]
    model = vitviz.create_model(f"hf:{folders[name]}")
    assert isinstance(model, HFImageModel) and isinstance(adapter_for(model), HFViT)
    assert model.hf.config._attn_implementation == "sdpa"  # loaded as transformers chose
    ref = _eager(folders[name])
    with torch.no_grad():
        out = ref(pixel_values=x, output_attentions=True, output_hidden_states=True)
    attentions = list(out.attentions)
    assert len(attentions) == 3
    n = attentions[0].shape[-1]
    assert n == prefix + 16
    w = (_siglip_pool(ref) if readout is None else readout)(out, prefix, n)
    expected = naive_rollout_row(attentions, w)[:, prefix:].reshape(2, 4, 4)
    got = explain_details(model, x, "rollout", upsample=False)
    torch.testing.assert_close(got.grid_maps.double(), expected, atol=1e-6, rtol=1e-4)
    # the logits of that same pass are the model's own (a tower: its pooled output or projected image_embeds)
    own = out.logits if has_head else out.image_embeds if "image_embeds" in out else out.pooler_output.flatten(1)
    torch.testing.assert_close(got.logits, own, atol=1e-5, rtol=1e-5)
    # the recorded weights are the model's eager weights, layer by layer
    cap = capture_attention(model, x)
    for mine, theirs in zip(cap.attentions, attentions, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
    assert model.hf.config._attn_implementation == "sdpa"  # SDPA back for every other call


@pytest.mark.parametrize("name", [n for n, spec in ARCHS.items() if spec[-1]])
def test_class_specific_maps_are_not_constant_and_differ_by_class(folders, x, name):
    model = vitviz.create_model(f"hf:{folders[name]}")
    for method in ("chefer", "gradcam", "grad-rollout"):
        maps = [explain(model, x, method, target=t) for t in (0, 1)]
        for m in maps:
            assert torch.isfinite(m).all()
            assert float(m.flatten(1).std(1).min()) > 1e-3, method
        assert not torch.allclose(maps[0], maps[1]), method


@pytest.mark.parametrize("name", [n for n, spec in ARCHS.items() if not spec[-1]])
def test_towers_without_a_classifier_get_class_agnostic_maps(folders, x, name):
    model = vitviz.create_model(f"hf:{folders[name]}")
    assert not model.has_head and model.num_classes == 0
    for method in ("attention", "rollout", "similarity"):
        assert float(explain(model, x, method).flatten(1).std(1).min()) > 1e-3
    with pytest.raises(ExplainError, match="no classifier head"):
        explain(model, x, "chefer")


def test_swin_records_its_windows_and_refuses_rollout_across_stages(folders, x):
    model = vitviz.create_model(f"hf:{folders['swin']}")
    assert isinstance(adapter_for(model), HFSwin)
    ref = _eager(folders["swin"])
    with torch.no_grad():
        out = ref(pixel_values=x, output_attentions=True)
    logits, rec = adapter_for(model).record_forward(x)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    assert [r.stage for r in rec.records] == [0, 0, 1, 1]
    assert [r.queries.grid for r in rec.records] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    # transformers returns the last block's attention of each stage: ours are the same weights
    for stage, theirs in enumerate(out.attentions):
        torch.testing.assert_close([r for r in rec.records if r.stage == stage][-1].weights, theirs)
    # densified on the grid, every query's row sums to one (no padding here) and stays inside its window
    dense = rec.records[0].dense().mean(1)  # (B, 64, 64)
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, 64))
    assert (dense[:, 0].reshape(2, 8, 8)[:, 4:, :] == 0).all()  # token (0, 0) sees only its 4x4 window
    with pytest.raises(ExplainError, match="between stages"):
        explain(model, x, "rollout")
    assert float(explain(model, x, "gradcam", target=2).flatten(1).std(1).min()) > 1e-3
    assert model.hf.config._attn_implementation == "sdpa"


def test_an_error_inside_a_recorded_call_restores_sdpa(folders, x):
    model = vitviz.create_model(f"hf:{folders['vit']}")
    with pytest.raises(RuntimeError, match="boom"), adapter_for(model).recording(32, 32):
        assert model.hf.config._attn_implementation == RECORDING
        raise RuntimeError("boom")
    assert model.hf.config._attn_implementation == "sdpa"


def test_towers_return_the_embedding_the_model_itself_returns(folders, x):
    """CLIPVisionModelWithProjection has no pooler_output: its embedding is image_embeds (post-norm class token,
    projected), not the raw class token; the bare towers' is their pooler_output (SigLIP: the attention pool)."""
    for name, field in (("clip-proj", "image_embeds"), ("clip", "pooler_output"), ("siglip", "pooler_output")):
        model = vitviz.create_model(f"hf:{folders[name]}")
        with torch.no_grad():
            out = _eager(folders[name])(pixel_values=x)
            got = model(x)
        torch.testing.assert_close(got, out[field], atol=1e-5, rtol=1e-5)
        # not the raw class token, nor (SigLIP) the token mean that stands in where there is no pooler
        for wrong in (out.last_hidden_state[:, 0], out.last_hidden_state.mean(1)):
            assert got.shape != wrong.shape or not torch.allclose(got, wrong, atol=1e-3), name
    assert vitviz.create_model(f"hf:{folders['clip-proj']}").output == "image_embeds"


@pytest.mark.parametrize("name", ["clip-cls", "siglip-cls"])
def test_clip_and_siglip_fine_tunes_are_classifiers_with_their_labels(tmp_path, x, name):
    config_factory, model_cls, *_ = ARCHS[name]
    config = config_factory(num_labels=2, **VIT_KW)
    config.id2label, config.label2id = {0: "tabby", 1: "husky"}, {"tabby": 0, "husky": 1}
    torch.manual_seed(2)
    model_cls(config).save_pretrained(tmp_path)
    model = vitviz.create_model(f"hf:{tmp_path}")
    assert model.has_head and model.class_names == ("tabby", "husky") and model.output == "logits"
    with torch.no_grad():
        torch.testing.assert_close(model(x), _eager(str(tmp_path))(pixel_values=x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"already has 2 classes of its own \(tabby, husky\).*Leave the prompts out"):
        vitviz.create_model(f"hf:{tmp_path}", prompts=["a dog"])
    from vitviz.models.hf import is_dual, with_prompts

    assert not is_dual(model)
    with pytest.raises(ConfigError, match="already has 2 classes"):
        with_prompts(model, ["a dog"])


def test_preprocessing_comes_from_the_folders_processor_config(folders, tmp_path):
    config = T.ViTConfig(**VIT_KW, num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    T.ViTForImageClassification(config).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"height": 32, "width": 32}}))
    model = vitviz.create_model(f"hf:{tmp_path}")
    assert model.preprocessing == {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "img_size": 32}
    assert model.class_names == ("cat", "dog")
    # without the file, the defaults of its model type (ViT checkpoints normalise with 0.5)
    assert vitviz.create_model(f"hf:{folders['vit']}").preprocessing["mean"] == (0.5, 0.5, 0.5)


def test_random_weights_and_config_overrides(folders, x):
    a = vitviz.create_model(f"hf:{folders['vit']}")
    b = vitviz.create_model(f"hf:{folders['vit']}", pretrained=False)
    assert not torch.allclose(a(x), b(x))  # the folder's weights are not the fresh random ones
    eager = vitviz.create_model(f"hf:{folders['vit']}", attn_implementation="eager")
    assert eager.hf.config._attn_implementation == "eager"
    torch.testing.assert_close(eager(x), a(x), atol=1e-5, rtol=1e-5)


def test_bad_sources_are_refused_with_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no such folder"):
        vitviz.create_model(f"hf:{tmp_path / 'nothing'}")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        vitviz.create_model(f"hf:{tmp_path / 'file.txt'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="without a loadable model"):
        vitviz.create_model(f"hf:{empty}")
    resnet = tmp_path / "resnet"
    T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(resnet)
    with pytest.raises(ConfigError, match="'resnet' model.*DINOv2"):
        vitviz.create_model(f"hf:{resnet}")
    T.ViTModel(T.ViTConfig(**VIT_KW)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="prompts need a CLIP or SigLIP"):
        vitviz.create_model(f"hf:{tmp_path / 'vit'}", prompts=["a dog"])


def _fake_hub_cache(root, repo: str, folder) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    import shutil

    commit = "0" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)


def test_hub_ids_load_from_the_local_cache_offline_and_advise_when_missing(folders, x, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    # transformers / huggingface_hub read these at import: point their module constants at the test's cache too
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path, "someone/tiny-vit", folders["vit"])
    model = vitviz.create_model("hf:someone/tiny-vit")
    torch.testing.assert_close(model(x), vitviz.create_model(f"hf:{folders['vit']}")(x))
    with pytest.raises(WeightsUnavailableError) as err:
        vitviz.create_model("hf:google/vit-base-patch16-224")
    assert "`hf download google/vit-base-patch16-224`" in str(err.value)
    assert "huggingface-cli" not in str(err.value)  # huggingface_hub >= 1.0 ships `hf`
    assert err.value.hub_id == "google/vit-base-patch16-224"
    assert "--model hf:" in hf_advice("google/vit-base-patch16-224", "cli")
    assert "sidebar" in hf_advice("google/vit-base-patch16-224", "dashboard")


def test_cli_explains_an_hf_folder_with_its_class_names(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vitviz.explain.cli import main

    config = T.ViTConfig(**VIT_KW, num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    T.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "map.png"
    code = main([str(tmp_path / "a.png"), "--model", f"hf:{tmp_path / 'vit'}", "--method", "chefer", "--target",
                 "dog", "--out", str(out)])
    assert code == 0
    assert "explained class: dog (index 1)" in capsys.readouterr().out
    assert np.load(out.with_suffix(".npy")).shape == (32, 32)
    assert main([str(tmp_path / "a.png"), "--model", f"hf:{tmp_path / 'vit'}", "--pretrained", "openai", "--out",
                 str(out)]) == 2
    assert "--pretrained TAG is for open_clip" in capsys.readouterr().err


def test_swin_rolls_out_its_last_stage_like_the_models_own_attention(tmp_path, x):
    """Stage 2 runs on a 4x4 grid, no larger than the 4x4 window: one window, so the model's own windowed
    attention is the dense matrix, and the last stage's rollout can be built from output_attentions alone."""
    torch.manual_seed(4)
    T.SwinForImageClassification(T.SwinConfig(embed_dim=16, depths=[2, 1], num_heads=[2, 2], image_size=32,
                                              patch_size=4, window_size=4, num_labels=3)).save_pretrained(tmp_path)
    model = vitviz.create_model(f"hf:{tmp_path}")
    with torch.no_grad():
        out = _eager(str(tmp_path))(pixel_values=x, output_attentions=True)
    last = out.attentions[-1]  # (B, heads, 16, 16): stage 2's only block
    expected = naive_rollout_row([last], torch.full((2, 16), 1 / 16)).reshape(2, 4, 4)
    got = explain_details(model, x, "rollout", start_layer=2, upsample=False)
    torch.testing.assert_close(got.grid_maps.double(), expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n, spec in ARCHS.items() if spec[-1]] + ["swin"])
def test_layer_features_and_the_logit_lens_end_at_the_models_own_logits(folders, x, name):
    from vitviz.represent.features import layer_features

    model = vitviz.create_model(f"hf:{folders[name]}")
    fp = layer_features(model, x, lens=True)
    assert len(fp.layers) == (4 if name == "swin" else 3)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(fp.layers[-1].lens_logits, expected, atol=1e-5, rtol=1e-5)
    # the lens of an earlier layer is a real, different reading of the same head
    earlier = fp.layers[-2].lens_logits
    assert earlier is not None and not torch.allclose(earlier, expected)
    grids = [f.grid for f in fp.layers]
    assert grids == ([(8, 8), (8, 8), (4, 4), (4, 4)] if name == "swin" else [(4, 4)] * 3)


def test_legrad_on_a_hugging_face_vit_reads_each_layer_through_its_head(folders, x):
    """The last layer's LeGrad map is the positive gradient of the logit w.r.t. that layer's attention, averaged
    over heads and queries (by hand from capture_attention's gradients); every layer's head is the model's own."""
    from vitviz.explain.legrad import legrad

    model = vitviz.create_model(f"hf:{folders['vit']}")
    res = legrad(model, x, target=1)
    cap = capture_attention(model, x, with_grads=True, target=1)
    g = cap.layers[-1].gradients  # (B, heads, N, N)
    expected = g.clamp(min=0).mean(dim=1).mean(dim=1)[:, 1:].reshape(2, 4, 4)
    torch.testing.assert_close(res.per_layer[-1], expected, atol=1e-6, rtol=1e-4)
    assert res.per_layer.shape == (3, 2, 4, 4) and float(res.maps.std()) > 0
    torch.testing.assert_close(res.logits, model(x).detach())


def test_vitviz_represent_reads_an_hf_folder(folders, tmp_path):
    """``vitviz represent --models hf:FOLDER`` on a folder of class sub-folders: CKA over the model's own layers,
    its logit lens and attention distances, one entry per transformers layer."""
    import numpy as np
    from PIL import Image

    from vitviz.cli import main

    rng = np.random.default_rng(0)
    for k in range(8):
        sub = tmp_path / "images" / f"c{k % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(sub / f"{k}.png")
    name = f"hf:{folders['vit']}"
    out = tmp_path / "out"
    assert main(["represent", "--models", name, "--images", str(tmp_path / "images"), "--n", "8", "--batch-size",
                 "4", "--embed", "none", "--gallery", "0", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 8 and [m["name"] for m in report["models"]] == [name]
    layers = [layer.label for layer in adapter_for(vitviz.create_model(name)).layers()]  # the model's module paths
    (cka,) = report["cka"]
    assert cka["labels_a"] == cka["labels_b"] == layers and len(layers) == 3 and cka["examples"] == 8
    grid = np.asarray(cka["grid"])
    np.testing.assert_allclose(np.diag(grid), 1.0, atol=1e-5)  # each layer against itself
    np.testing.assert_allclose(grid, grid.T, atol=1e-5)
    (lens,) = report["lens"]
    assert lens["model"] == name and lens["layers"] == 3 and lens["agreement"][-1] == 1.0  # the last layer: the logits
    (dist,) = report["attention_distance"]
    assert len(dist["mean_px"]) == 3 and all(0 < d < 32 * 2 ** 0.5 for d in dist["mean_px"])
    assert lens["labels"] == layers
    assert (out / "report.md").is_file() and all((out / f).is_file() for f in report["figures"])


def test_whether_to_try_the_hub_follows_offline_mirror_and_proxy_settings(monkeypatch):
    from vitviz.models import pretrained
    from vitviz.models.pretrained import hub_check, hub_reachable

    assert hub_check({}) == ("socket", ("huggingface.co", 443))
    assert hub_check({"HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://proxy:3128"}) == ("offline", None)
    assert hub_check({"HF_HUB_OFFLINE": "0"}) == ("socket", ("huggingface.co", 443))
    # a mirror: its own host and port are what must answer
    assert hub_check({"HF_ENDPOINT": "https://hf-mirror.com"}) == ("socket", ("hf-mirror.com", 443))
    assert hub_check({"HF_ENDPOINT": "http://mirror.lan:8080/"}) == ("socket", ("mirror.lan", 8080))
    # a proxy carries the traffic: a raw socket cannot test that route, the download client decides
    assert hub_check({"HTTPS_PROXY": "http://proxy:3128"}) == ("defer", None)
    assert hub_check({"all_proxy": "socks5://proxy:1080"}) == ("defer", None)
    assert hub_check({"https_proxy": "http://proxy:3128", "no_proxy": ".huggingface.co"})[0] == "socket"
    assert hub_check({"HTTP_PROXY": "http://proxy:3128"})[0] == "socket"  # plain http: not the Hub's https
    assert hub_check({"HTTP_PROXY": "http://p:1", "HF_ENDPOINT": "http://mirror.lan"}) == ("defer", None)

    tried = []

    class Refused:
        def __init__(self, address, timeout):
            tried.append(address)
            raise OSError("refused")

    monkeypatch.setattr(pretrained.socket, "create_connection", Refused)
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    assert hub_reachable() is False and tried == [("hf-mirror.com", 443)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub_reachable() is True and len(tried) == 1  # not forced offline: transformers tries through the proxy
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_recording_one_layer_runs_only_that_layer_eagerly(folders, x, name):
    """The attention map of one layer: its module alone takes the eager path, the others keep SDPA."""
    model = vitviz.create_model(f"hf:{folders[name]}")
    attention = [m for m in model.hf.modules() if hasattr(m, "config") and hasattr(m, "scaling") or
                 type(m).__name__ == "SwinAttention"]
    seen: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, _i: seen.append(m.config._attn_implementation))
               for m in attention]
    try:
        cap = capture_attention(model, x, only_layer=1)
    finally:
        for h in handles:
            h.remove()
    assert len(attention) == len(seen) >= 3 and seen[1] == RECORDING and seen.count(RECORDING) == 1, seen
    with torch.no_grad():
        out = _eager(folders[name])(pixel_values=x, output_attentions=True)
    if name == "vit":  # the one layer recorded is the model's own eager weights of that layer
        assert len(cap.attentions) == 1
        torch.testing.assert_close(cap.attentions[0], out.attentions[1], atol=1e-6, rtol=1e-5)
    assert all(m.config._attn_implementation == "sdpa" for m in attention)  # the copies are gone
    assert all(m.config is model.hf.config or m.config is getattr(model.hf.config, "vision_config", None)
               for m in attention)


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_layer_features_are_the_models_own_hidden_states(folders, x, name):
    """Each layer's readout and patch tokens are the block outputs transformers itself returns
    with output_hidden_states (hidden_states[0] is the embedding, hidden_states[i + 1] block i's output)."""
    from vitviz.represent.features import layer_features

    model = vitviz.create_model(f"hf:{folders[name]}")
    fp = layer_features(model, x)
    with torch.no_grad():
        hidden = model.hf(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(fp.layers) == len(hidden) - 1
    prefix = 1 + int(getattr(model.hf.config, "num_register_tokens", 0) or 0)
    for i, layer in enumerate(fp.layers):
        cls, patches = hidden[i + 1][:, 0], hidden[i + 1][:, prefix:]
        # what the head reads: the class token (ViT), class token and patch mean side by side (DINOv2)
        expected = cls if name == "vit" else torch.cat([cls, patches.mean(dim=1)], dim=-1)
        torch.testing.assert_close(layer.readout, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.patches, hidden[i + 1][:, prefix:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fp.layers[0].readout, fp.layers[-1].readout)  # distinct layers, not one copied
