"""Which methods work on which model families: the list of models, and one check per (model, method).

``tests/test_coverage.py`` asserts on it and ``docs/make_coverage.py`` writes ``docs/coverage.md`` from
it, so the table and the tests can never disagree. Each model is built with random weights at a small
size (zero-initialised norm gains set to one): coverage is a property of the architecture, not of the
weights. timm models come from ``timm.create_model``; Hugging Face models are built from a tiny config,
saved with ``save_pretrained`` into a temporary folder and opened with ``create_model("hf:<folder>")``
(a CLIPModel / SiglipModel with a word-level tokenizer written beside it and five prompts as its classes);
the open_clip CLIP is a shrunk ViT-B-32 whose classes are five prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitviz.errors import VitvizError

__all__ = ["ANALYSES", "COVERAGE_MODELS", "CHECKS", "CoverageModel", "Outcome", "build", "check", "input_for"]


@dataclass(frozen=True)
class CoverageModel:
    """One timm architecture in the coverage table."""

    family: str  # the row label, e.g. "DeiT (distilled)"
    name: str  # timm model name
    kwargs: dict[str, Any] = field(default_factory=dict)  # small-size overrides for timm.create_model
    size: int = 32  # input side in pixels
    perturb: float = 0.0  # std of noise added to every weight after timm's init, for inits that are degenerate
    source: str = "timm"  # "timm", "hf" (name: a transformers class) or "open_clip" (name: an architecture)

    @property
    def key(self) -> str:
        return f"{self.family}: {self.name}"


_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
_VIT14 = {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 48, "num_heads": 3}
_HF = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 96, "image_size": 32,
       "patch_size": 8}
# the text side of the dual encoders: as wide as the vision side (SigLIP compares them without a projection)
_HF_TEXT = {"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 3, "intermediate_size": 96,
            "vocab_size": 16, "max_position_embeddings": 16, "eos_token_id": 2, "pad_token_id": 0}
_SWIN = {"img_size": 64, "depths": (1, 1, 1, 1), "window_size": 2, "embed_dim": 24, "num_heads": (1, 1, 2, 2)}

COVERAGE_MODELS: tuple[CoverageModel, ...] = (
    CoverageModel("ViT", "vit_tiny_patch16_224", _VIT),
    CoverageModel("ViT (augreg)", "vit_small_patch16_224", _VIT),
    CoverageModel("ViT, registers + gap", "vit_base_patch16_reg4_gap_256", _VIT),
    CoverageModel("ViT, gap", "vit_medium_patch16_gap_240", _VIT),
    CoverageModel("ViT, res-post-norm", "vit_base_patch16_rpn_224", _VIT),
    CoverageModel("ViT, parallel branches", "vit_small_patch16_18x2_224", _VIT),
    CoverageModel("ViT, parallel scaling", "vit_base_patch16_xp_224", _VIT),
    CoverageModel("ViT hybrid (R-Ti)", "vit_tiny_r_s16_p8_224", {"img_size": 64, "depth": 2}, size=64),
    CoverageModel("FlexiViT", "flexivit_small", _VIT),
    CoverageModel("DeiT", "deit_tiny_patch16_224", _VIT),
    CoverageModel("DeiT (distilled)", "deit_tiny_distilled_patch16_224", _VIT),
    CoverageModel("DeiT-III", "deit3_small_patch16_224", _VIT),
    CoverageModel("DINOv2 + registers", "vit_small_patch14_reg4_dinov2", _VIT14, size=28),
    CoverageModel("DINOv2, headless", "vit_small_patch14_dinov2", {**_VIT14, "num_classes": 0}, size=28),
    CoverageModel("CLIP", "vit_base_patch16_clip_224", _VIT),
    CoverageModel("CLIP, headless", "vit_base_patch32_clip_224", {**_VIT, "num_classes": 0}),
    CoverageModel("SigLIP (attention pool)", "vit_base_patch16_siglip_224", _VIT),
    CoverageModel("EVA", "eva_giant_patch14_224", _VIT14, size=28),
    CoverageModel("EVA-02", "eva02_tiny_patch14_224", {"img_size": 28, "patch_size": 7, "depth": 2}, size=28),
    CoverageModel("ViT, rotary (EVA class)", "vit_small_patch16_rope_224", _VIT),
    CoverageModel("BEiT", "beit_base_patch16_224", _VIT),
    CoverageModel("BEiT-v2", "beitv2_base_patch16_224", _VIT),
    CoverageModel("CaiT", "cait_xxs24_224", {"img_size": 32, "patch_size": 8, "depth": 2, "depth_token_only": 1}),
    CoverageModel("XCiT", "xcit_nano_12_p16_224", {"img_size": 32, "depth": 2}),
    CoverageModel("ConViT", "convit_tiny", {"img_size": 32, "patch_size": 8, "depth": 3, "local_up_to_layer": 2}),
    CoverageModel("Swin", "swin_tiny_patch4_window7_224", _SWIN, size=64),
    CoverageModel("Swin-V2", "swinv2_tiny_window8_256", _SWIN, size=64),
    CoverageModel("PiT", "pit_ti_224", {"img_size": 64}, size=64),
    CoverageModel("PiT (distilled)", "pit_ti_distilled_224", {"img_size": 64}, size=64),
    # timm's LeViT init makes every token equal after the first stage of a random model: perturbed
    CoverageModel("LeViT", "levit_128s", {"img_size": 128}, size=128, perturb=0.1),
    CoverageModel("PVT-v2", "pvt_v2_b0", {}, size=64),
    CoverageModel("PVT-v2 (linear)", "pvt_v2_b2_li", {"depths": (1, 1, 1, 1)}, size=64),
    CoverageModel("Twins-SVT", "twins_svt_small", {"img_size": 64, "depths": (1, 1, 1, 1)}, size=64),
    CoverageModel("Twins-PCPVT", "twins_pcpvt_small", {"img_size": 64, "depths": (1, 1, 1, 1)}, size=64),
    CoverageModel("CrossViT", "crossvit_tiny_240", {"img_size": 120}, size=120),
    CoverageModel("ConvNeXt", "convnext_atto", {}, size=64),
    CoverageModel("EfficientNet", "efficientnet_b0", {}, size=64),
    CoverageModel("RegNet", "regnetx_002", {}, size=64),
    CoverageModel("ResNet", "resnet18", {}, size=64),
    CoverageModel("ResNet-D", "resnet18d", {}, size=64),
    CoverageModel("MobileNet-V3", "mobilenetv3_small_100", {}, size=64),
    CoverageModel("MaxViT (no attention adapter)", "maxvit_tiny_tf_224", {"img_size": 64}, size=64),
    # Hugging Face transformers: kwargs are the config class and its fields
    CoverageModel("HF ViT", "ViTForImageClassification", {"config": "ViTConfig", **_HF}, source="hf"),
    CoverageModel("HF DeiT (distilled)", "DeiTForImageClassificationWithTeacher", {"config": "DeiTConfig", **_HF},
                  perturb=0.02, source="hf"),
    CoverageModel("HF BEiT", "BeitForImageClassification", {"config": "BeitConfig", **_HF}, source="hf"),
    CoverageModel("HF DINOv2", "Dinov2ForImageClassification", {"config": "Dinov2Config", **_HF}, source="hf"),
    CoverageModel("HF DINOv2 + registers, headless", "Dinov2WithRegistersModel",
                  {"config": "Dinov2WithRegistersConfig", "num_register_tokens": 4, **_HF}, source="hf"),
    CoverageModel("HF Swin", "SwinForImageClassification",
                  {"config": "SwinConfig", "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "image_size": 32,
                   "patch_size": 4, "window_size": 4}, source="hf"),
    CoverageModel("HF CLIP tower, headless", "CLIPVisionModel", {"config": "CLIPVisionConfig", **_HF}, source="hf"),
    CoverageModel("HF SigLIP tower, headless", "SiglipVisionModel", {"config": "SiglipVisionConfig", **_HF},
                  source="hf"),
    CoverageModel("HF CLIP + prompts", "CLIPModel",
                  {"config": "CLIPConfig", "vision_config": _HF, "text_config": _HF_TEXT, "projection_dim": 16},
                  source="hf"),
    CoverageModel("HF SigLIP + prompts", "SiglipModel",
                  {"config": "SiglipConfig", "vision_config": _HF, "text_config": _HF_TEXT}, source="hf"),
    CoverageModel("open_clip CLIP + prompts", "ViT-B-32", {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
        source="open_clip"),
)

METHOD_CHECKS = ("attention", "rollout", "grad-rollout", "chefer", "gradcam", "similarity", "legrad", "attnlrp")
ANALYSES = ("filters", "positions", "distance", "pca")
CHECKS = METHOD_CHECKS + ANALYSES


@dataclass
class Outcome:
    """What one check gave: "ok", "refused" (with the reason) or "failed" (with what went wrong)."""

    status: str
    detail: str = ""


def build(entry: CoverageModel, seed: int = 0, num_classes: int = 5) -> nn.Module:
    """The model of ``entry`` with seeded random weights, in eval mode."""
    if entry.source == "hf":
        model = _build_hf(entry, seed, num_classes)
        if entry.perturb:  # transformers zero-initialises some embeddings (DeiT's positions)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * entry.perturb)
        return model
    if entry.source == "open_clip":
        import vitviz

        torch.manual_seed(seed)
        prompts = [f"a photo of shape {i}" for i in range(num_classes)]
        return vitviz.create_model(f"open_clip:{entry.name}", prompts=prompts, **entry.kwargs)
    import timm

    torch.manual_seed(seed)
    kwargs = {"num_classes": num_classes, **entry.kwargs}
    model = timm.create_model(entry.name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        # Some families zero-initialise residual-branch norm gains (LeViT), which makes every token of a
        # random model equal after the first stage and every map constant: give them unit gain.
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight") and not bool(p.any()):
                p.fill_(1.0)
        if entry.perturb:
            gen = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * entry.perturb)
    return model


def _build_hf(entry: CoverageModel, seed: int, num_classes: int) -> nn.Module:
    """A transformers model from a tiny config, saved and opened through ``create_model("hf:<folder>")``."""
    import shutil
    import tempfile

    import transformers

    import vitviz

    fields = {k: v for k, v in entry.kwargs.items() if k != "config"}
    config = getattr(transformers, entry.kwargs["config"])(**fields, num_labels=num_classes)
    torch.manual_seed(seed)
    folder = tempfile.mkdtemp(prefix="vitviz-coverage-")
    try:
        getattr(transformers, entry.name)(config).save_pretrained(folder)
        if "text_config" not in fields:
            return vitviz.create_model(f"hf:{folder}")
        prompts = [f"a photo of shape {i}" for i in range(num_classes)]  # a dual encoder: the prompts are its classes
        _word_tokenizer(folder, prompts)
        return vitviz.create_model(f"hf:{folder}", prompts=prompts)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _word_tokenizer(folder: str, texts: list[str]) -> None:
    """A word-level fast tokenizer over ``texts``' words, saved like a Hub tokenizer (no vocabulary download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    tok = Tokenizer(models.WordLevel(vocab={"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in
                                                                                      enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                            model_max_length=16).save_pretrained(folder)


def input_for(entry: CoverageModel, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """A seeded random image batch of the entry's size, (B, 3, S, S)."""
    return torch.randn(batch, 3, entry.size, entry.size, generator=torch.Generator().manual_seed(seed))


def _finite_varied(t: torch.Tensor) -> Outcome:
    t = t.detach().float()
    if not bool(torch.isfinite(t).all()):
        return Outcome("failed", "the result is not finite")
    if t.numel() > 1 and float(t.std()) == 0.0:
        return Outcome("failed", "the result is constant")
    return Outcome("ok")


def _run(model: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    from vitviz.explain import attention_distance, explain, feature_pca, patch_embedding_weight, position_similarity

    if what in METHOD_CHECKS:
        return explain(model, x, what, upsample=False)
    if what == "filters":
        return patch_embedding_weight(model)
    if what == "positions":
        return position_similarity(model)
    if what == "distance":
        d = attention_distance(model, x)
        return d[torch.isfinite(d)]
    return feature_pca(model, x)[0]


def check(model: nn.Module, x: torch.Tensor, what: str) -> Outcome:
    """Run one method or analysis: "ok" for a finite, varied result; "refused" for a VitvizError."""
    try:
        result = _run(model, x, what)
    except VitvizError as err:
        return Outcome("refused", str(err).splitlines()[0])
    except Exception as err:  # the point of coverage: anything else is a bug to report, not to hide
        return Outcome("failed", f"{type(err).__name__}: {err}")
    return _finite_varied(result)


def conversion(model: nn.Module, x: torch.Tensor) -> Outcome:
    """Whether ``from_timm`` converts the model, and if so whether logits agree within 1e-4 relative."""
    from vitviz.models.timm_interop import from_timm

    if not type(model).__module__.startswith("timm."):
        return Outcome("n/a", "not a timm model")
    try:
        ours = from_timm(model)
    except VitvizError as err:
        return Outcome("refused", str(err).splitlines()[0])
    except Exception as err:
        return Outcome("failed", f"{type(err).__name__}: {err}")
    with torch.no_grad():
        a, b = model(x), ours(x)
    scale = float(a.abs().max())
    err = float((a - b).abs().max())
    if not math.isfinite(err) or err > 1e-4 * max(scale, 1e-6):
        return Outcome("failed", f"logits differ by {err:.2e} (max |logit| {scale:.2e})")
    return Outcome("ok", f"max |Δ logit| {err:.1e}")

