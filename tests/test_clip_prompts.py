"""CLIP with typed prompts: open_clip (random weights, the tokenizer that ships with it) and a Hugging Face
CLIPModel (tiny random config, a word-level tokenizer the test writes). The logits the methods explain are the
libraries' own image-to-text logits for those prompts."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import pytest
import torch
import transformers as T
from torch import nn

import vitviz
from vitviz.errors import ConfigError, WeightsUnavailableError
from vitviz.explain import adapter_for, capture_attention, explain, explain_details
from vitviz.explain.adapters.clip import OpenClipViT, PromptAdapter
from vitviz.models.clip import MAX_PROMPTS, PromptClassifier, check_prompts

PROMPTS = ["a dog", "a red car", "a cat"]
ARCH = "ViT-B-32"
SIZE = 64
# open_clip's ViT-B-32 with its real tokenizer, shrunk through create_model's config overrides to stay fast
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=SIZE, layers=3, width=64, head_width=32, patch_size=16),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))


@pytest.fixture(scope="module")
def clip() -> PromptClassifier:
    torch.manual_seed(0)
    return vitviz.create_model(f"open_clip:{ARCH}", prompts=PROMPTS, **TINY)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def open_clip_logits(clip: PromptClassifier, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """open_clip's own forward: image and text features, then logit_scale * image @ text.T."""
    tokens = open_clip.get_tokenizer(ARCH)(prompts)
    with torch.no_grad():
        image, text, scale = clip.text_model(x, tokens)[:3]
    return scale * image @ text.T  # (B, prompts)


def test_the_logits_are_open_clips_own_image_text_logits(clip, x):
    assert isinstance(adapter_for(clip), PromptAdapter)
    assert isinstance(adapter_for(clip).inner, OpenClipViT)
    assert clip.class_names == tuple(PROMPTS) and clip.num_classes == 3
    expected = open_clip_logits(clip, x, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(clip(x), expected, atol=1e-5, rtol=1e-5)
    # what the gradient methods differentiate: Grad-CAM's pass, and the recorded pass of rollout / Chefer
    cam = adapter_for(clip).cam_forward(x, None)
    torch.testing.assert_close(cam.logits.detach(), expected, atol=1e-5, rtol=1e-5)
    cap = capture_attention(clip, x, with_grads=True, target=1)
    torch.testing.assert_close(cap.logits.detach(), expected, atol=1e-5, rtol=1e-5)
    for method in ("chefer", "gradcam", "grad-rollout"):
        details = explain_details(clip, x, method, target=1)
        torch.testing.assert_close(details.logits.detach(), expected, atol=1e-5, rtol=1e-5)


def test_recorded_attention_is_torchs_own_multihead_attention(clip, x):
    """Our explicit forward keeps the weights in the graph; they equal nn.MultiheadAttention's need_weights ones."""
    theirs: list[torch.Tensor] = []
    handles = []
    for blk in clip.encoder.transformer.resblocks:
        def hook(_m: nn.Module, inputs: tuple, _out: object, blk: nn.Module = blk) -> None:
            h = inputs[0]
            _, w = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
            theirs.append(w)

        handles.append(blk.ln_1.register_forward_hook(lambda m, i, o, hook=hook: hook(m, (o,), None)))
    try:
        with torch.no_grad():
            clip(x)
    finally:
        for h in handles:
            h.remove()
    cap = capture_attention(clip, x)
    assert len(cap.attentions) == len(theirs) == 3
    for mine, ref in zip(cap.attentions, theirs, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-5)
    # afterwards the modules are torch's again: no instance forward left behind
    assert all("forward" not in blk.attn.__dict__ for blk in clip.encoder.transformer.resblocks)


def test_each_prompt_gets_its_own_map(clip, x):
    for method in ("chefer", "gradcam", "grad-rollout"):
        maps = [explain(clip, x, method, target=t) for t in range(3)]
        for m in maps:
            assert float(m.flatten(1).std(1).min()) > 1e-3, method
        assert not torch.allclose(maps[0], maps[1]) and not torch.allclose(maps[1], maps[2]), method
    # class-agnostic methods do not depend on the prompts
    assert float(explain(clip, x, "rollout").flatten(1).std(1).min()) > 1e-3


def test_set_prompts_changes_the_classes(x):
    torch.manual_seed(0)
    model = vitviz.create_model(f"open_clip:{ARCH}", prompts=PROMPTS, **TINY)
    model.set_prompts(["a boat", "a dog"])
    assert model.class_names == ("a boat", "a dog")
    torch.testing.assert_close(model(x).detach(), open_clip_logits(model, x, ["a boat", "a dog"]), atol=1e-5,
                               rtol=1e-5)


def test_bad_prompts_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="at least one non-empty prompt"):
        check_prompts(["a dog", "  "])
    with pytest.raises(ConfigError, match="repeated: a dog"):
        check_prompts(["a dog", "a dog "])
    with pytest.raises(ConfigError, match=f"at most {MAX_PROMPTS}"):
        check_prompts([f"p{i}" for i in range(MAX_PROMPTS + 1)])
    assert check_prompts(" a dog ") == ["a dog"]
    with pytest.raises(ConfigError, match="prompts are for CLIP models"):
        vitviz.create_model("vit_p4_d8_32", prompts=["a dog"])


def test_weights_files_unknown_tags_and_offline_advice(clip, x, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in clip.text_model.state_dict().items()}
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    loaded = vitviz.create_model(f"open_clip:{ARCH}", pretrained_file=path, prompts=PROMPTS, **TINY)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clip(x))
    with pytest.raises(ConfigError, match="no pretrained tag 'nonsense'"):
        vitviz.create_model(f"open_clip:{ARCH}", pretrained="nonsense")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        vitviz.create_model(f"open_clip:{ARCH}", pretrained_file=tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="no model 'ViT-Nope'"):
        vitviz.create_model("open_clip:ViT-Nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsUnavailableError, match="huggingface.co/timm/vit_base_patch32_clip_224.openai"):
        vitviz.create_model("open_clip:ViT-B-32", pretrained="openai")


# --- a Hugging Face CLIPModel with prompts ------------------------------------------------------------

def _word_tokenizer(folder, words: list[str]) -> None:
    """A word-level fast tokenizer saved like any Hub tokenizer (no network, no vocabulary download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                     model_max_length=16)
    fast.save_pretrained(folder)


def hf_dual_folder(folder, kind: str = "clip", prompts: Sequence[str] = PROMPTS, size: int = SIZE) -> type:
    """A tiny random CLIPModel / SiglipModel and a word tokenizer for ``prompts``' words saved into ``folder``;
    returns the transformers class."""
    from vitviz.models.clip import DEFAULT_PROMPTS

    torch.manual_seed(3)
    words = sorted({w for p in [*prompts, *DEFAULT_PROMPTS] for w in p.split()})
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                vocab_size=len(words) + 3, max_position_embeddings=16, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=size,
                  patch_size=16)
    if kind == "clip":
        model_cls, config = T.CLIPModel, T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    else:  # SigLIP: no projection, a learned bias
        model_cls, config = T.SiglipModel, T.SiglipConfig(text_config=text, vision_config=vision)
    model_cls(config).save_pretrained(folder)
    _word_tokenizer(folder, words)
    return model_cls


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_hugging_face_dual_encoder_with_prompts_explains_its_own_logits(tmp_path, x, kind):
    model_cls = hf_dual_folder(tmp_path, kind)
    padding = True if kind == "clip" else "max_length"  # SigLIP: texts padded to the full length as in training
    model = vitviz.create_model(f"hf:{tmp_path}", prompts=PROMPTS)
    assert isinstance(model, PromptClassifier) and model.class_names == tuple(PROMPTS)
    ref = model_cls.from_pretrained(tmp_path).eval()
    tok = T.AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = ref(pixel_values=x, **tok(PROMPTS, padding=padding, return_tensors="pt")).logits_per_image
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    details = explain_details(model, x, "chefer", target=2)
    torch.testing.assert_close(details.logits.detach(), expected, atol=1e-5, rtol=1e-5)
    assert float(details.maps.flatten(1).std(1).min()) > 1e-3
    assert adapter_for(model).readout_kind() == ("token" if kind == "clip" else "pool")
    # Grad-CAM through the prompt similarity: a map per prompt, each varied, and not the same map
    cams = [explain(model, x, "gradcam", target=t) for t in range(3)]
    for cam in cams:
        assert torch.isfinite(cam).all() and float(cam.flatten(1).std(1).min()) > 1e-3
    assert not torch.allclose(cams[0], cams[1]) and not torch.allclose(cams[1], cams[2])
    # without prompts the same folder is an image tower: embeddings, no classes
    tower = vitviz.create_model(f"hf:{tmp_path}")
    assert not tower.has_head
    with torch.no_grad():
        image = ref.get_image_features(pixel_values=x)
        image = getattr(image, "pooler_output", image)  # a tensor, or an output object in newer transformers
        torch.testing.assert_close(tower(x), image, atol=1e-5, rtol=1e-5)


# --- the CLI --------------------------------------------------------------------------------------------

def test_cli_explains_a_prompt_and_lists_prompt_probabilities(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vitviz.explain.cli import main

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "map.png"
    args = [str(tmp_path / "a.png"), "--model", "open_clip:ViT-B-32", "--method", "gradcam", "--out", str(out)]
    prompts = ["--prompt", "a dog", "--prompt", "a red car"]
    assert main(args + prompts) == 2
    assert "needs weights: --pretrained TAG" in capsys.readouterr().err
    assert main(args + ["--random-weights", "--prompt", "a dog", "--prompt", "a dog"]) == 2
    assert "repeated: a dog" in capsys.readouterr().err
    assert main(args + prompts + ["--random-weights", "--target", "a red car"]) == 0
    text = capsys.readouterr().out
    assert "a dog" in text and "explained class: a red car (index 1)" in text
    assert out.is_file() and np.load(out.with_suffix(".npy")).shape == (224, 224)


def _probabilities(text: str) -> dict[str, float]:
    """The CLI's "prompt probabilities:" block as {prompt: probability}."""
    import re

    rows = text.split("prompt probabilities:")[1].split("explained class")[0]
    return {m[1].strip(): float(m[2]) for m in re.finditer(r"^\s+\d+\. (.+?)\s+([01]\.\d{4})  \(index", rows, re.M)}


def test_cli_on_an_hf_clip_scores_default_prompts_and_prints_every_prompt(tmp_path, capsys):
    """As open_clip: no --prompt means the default prompts; every prompt's probability is printed (not a top 5)."""
    import numpy as np
    from PIL import Image

    from vitviz.explain.cli import main
    from vitviz.models.clip import DEFAULT_PROMPTS

    many = ["a dog", "a red car", "a cat", "a boat", "a tree", "a house", "a bird"]
    hf_dual_folder(tmp_path / "clip", "clip", prompts=many, size=32)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--model", f"hf:{tmp_path / 'clip'}", "--method", "gradcam", "--out",
            str(tmp_path / "m.png")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "no --prompt given: scoring the default prompts" in captured.err and "--prompt TEXT" in captured.err
    assert set(_probabilities(captured.out)) == set(DEFAULT_PROMPTS)
    assert main(args + [a for p in many for a in ("--prompt", p)] + ["--target", "a bird"]) == 0
    text = capsys.readouterr().out
    probs = _probabilities(text)
    assert set(probs) == set(many) and abs(sum(probs.values()) - 1) < 5e-3  # all 7 rows, a distribution
    assert list(probs.values()) == sorted(probs.values(), reverse=True)
    assert "top-5" not in text and "explained class: a bird (index 6)" in text


def test_the_logit_lens_of_a_prompt_classifier_ends_at_its_logits(clip, x):
    from vitviz.represent.features import layer_features

    fp = layer_features(clip, x, lens=True)
    assert [f.label for f in fp.layers] == [f"transformer.resblocks.{i}" for i in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(fp.layers[-1].lens_logits, clip(x), atol=1e-5, rtol=1e-5)
    assert fp.layers[-1].split.prefix == 1 and fp.layers[-1].grid == (4, 4)


def test_open_clips_own_log_lines_are_left_out_while_vitviz_loads(caplog):
    """Random weights were asked for, so open_clip's 'No pretrained weights loaded' warning is noise; the filter
    that drops it is gone after the call (open_clip's other messages still pass)."""
    import logging

    root = logging.getLogger()
    before = list(root.filters)
    with caplog.at_level(logging.WARNING):
        vitviz.create_model(f"open_clip:{ARCH}", prompts=PROMPTS, **TINY)
        assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()], caplog.records
        assert root.filters == before
        logging.warning("No pretrained weights loaded for model 'X'")  # the same words outside the call pass
    assert any("No pretrained weights" in r.getMessage() for r in caplog.records)
