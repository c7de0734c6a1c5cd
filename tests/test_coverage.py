"""Every timm family in vitviz.coverage: each method gives a finite, varied map or a VitvizError with a reason.

The same list writes docs/coverage.md (docs/make_coverage.py). Random weights at small sizes:
coverage is a property of the architecture.
"""

from __future__ import annotations

import pytest

from vitviz.coverage import CHECKS, COVERAGE_MODELS, build, check, conversion, input_for
from vitviz.explain import adapter_for, capture_attention, has_attention

ALL_METHODS = {"attention", "rollout", "grad-rollout", "chefer", "gradcam", "similarity", "distance", "pca"}
GRID_ONLY = {"attention", "gradcam", "similarity", "distance", "pca"}  # stages change the grid: no rollout
CNN = {"gradcam", "similarity", "pca"}
HEADLESS = {"attention", "rollout", "similarity", "distance", "pca"}

# What must work on each family (at least); anything else may be refused with a reason, never fail.
MUST = {
    "ViT, parallel scaling": CNN,  # attention is computed inline there: refused by name
    "DINOv2, headless": HEADLESS,
    "CLIP, headless": HEADLESS,
    "XCiT": GRID_ONLY - {"distance"},  # channel attention, and token attention only from the class token
    "Swin": GRID_ONLY, "Swin-V2": GRID_ONLY, "PiT": GRID_ONLY, "PiT (distilled)": GRID_ONLY,
    "LeViT": GRID_ONLY, "PVT-v2": GRID_ONLY, "PVT-v2 (linear)": GRID_ONLY, "Twins-SVT": GRID_ONLY,
    "Twins-PCPVT": GRID_ONLY, "CrossViT": GRID_ONLY,
    "ConvNeXt": CNN, "EfficientNet": CNN, "RegNet": CNN, "ResNet": CNN, "ResNet-D": CNN, "MobileNet-V3": CNN,
    "MaxViT (no attention adapter)": CNN,
    "HF DINOv2 + registers, headless": HEADLESS, "HF CLIP tower, headless": HEADLESS,
    "HF SigLIP tower, headless": HEADLESS, "HF Swin": GRID_ONLY,
}
# LeGrad must run on every flat transformer with a classifier head; AttnLRP on every transformer with a head
# (vitviz.explain.attnlrp); elsewhere they are refused with the reason.
FLAT_WITH_HEAD = {
    "ViT", "ViT (augreg)", "ViT, registers + gap", "ViT, gap", "ViT, res-post-norm", "ViT, parallel branches",
    "FlexiViT", "DeiT", "DeiT (distilled)", "DeiT-III", "DINOv2 + registers", "CLIP", "SigLIP (attention pool)",
    "EVA", "EVA-02", "ViT, rotary (EVA class)", "BEiT", "BEiT-v2", "HF ViT", "HF DeiT (distilled)", "HF BEiT",
    "HF DINOv2", "HF CLIP + prompts",
}
ATTNLRP = FLAT_WITH_HEAD | {
    "Swin", "HF Swin", "ViT hybrid (R-Ti)", "ViT, parallel scaling", "CaiT", "XCiT", "ConViT", "Swin-V2", "PiT",
    "PiT (distilled)", "LeViT", "PVT-v2", "PVT-v2 (linear)", "Twins-SVT", "Twins-PCPVT", "CrossViT",
    "open_clip CLIP + prompts", "HF SigLIP + prompts"}
# Fig. 7 analyses that must work: filters where the stem is a linear patch projection, positions where
# they are learned absolute embeddings, distance wherever there is token attention.
FIG7 = {
    "ViT": {"filters", "positions", "distance"},
    "DeiT (distilled)": {"filters", "positions", "distance"},
    "DINOv2 + registers": {"filters", "positions", "distance"},
    "EVA-02": {"filters", "positions", "distance"},
    "Swin": {"distance"},
    "PVT-v2": {"distance"},
    "HF ViT": {"filters", "positions", "distance"},
    "HF DINOv2": {"filters", "positions", "distance"},
    "HF CLIP tower, headless": {"filters", "positions", "distance"},
    "HF Swin": {"distance"},
    "open_clip CLIP + prompts": {"filters", "positions", "distance"},
}


def test_the_list_covers_at_least_40_models_and_every_family():
    assert len(COVERAGE_MODELS) >= 40
    families = {m.family for m in COVERAGE_MODELS}
    assert set(MUST) <= families and set(FIG7) <= families and set(ATTNLRP) <= families


@pytest.mark.parametrize("entry", COVERAGE_MODELS, ids=lambda e: e.name)
def test_every_method_works_or_is_refused_with_a_reason(entry):
    model = build(entry)
    x = input_for(entry)
    adapter_for(model)  # every timm model has an adapter, if only the generic one
    if has_attention(model):  # capture is one forward pass on every family
        calls = []
        handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            capture_attention(model, x, with_grads=adapter_for(model).has_head)
        finally:
            handle.remove()
        assert len(calls) == 1
    outcomes = {what: check(model, x, what) for what in CHECKS}
    failed = {k: o.detail for k, o in outcomes.items() if o.status == "failed"}
    assert not failed, failed
    for what, o in outcomes.items():
        if o.status == "refused":
            assert len(o.detail) > 20, f"{what}: a refusal must say why ({o.detail!r})"
    must = MUST.get(entry.family, ALL_METHODS) | FIG7.get(entry.family, set())
    must |= {"legrad"} if entry.family in FLAT_WITH_HEAD else set()
    must |= {"attnlrp"} if entry.family in ATTNLRP else set()
    not_ok = {k: outcomes[k].detail for k in must if outcomes[k].status != "ok"}
    assert not not_ok, not_ok


@pytest.mark.parametrize("entry", [m for m in COVERAGE_MODELS if m.family in (
    "ViT", "DeiT-III", "DINOv2 + registers", "ResNet", "DeiT (distilled)", "ViT, res-post-norm")],
    ids=lambda e: e.name)
def test_conversions_keep_timms_logits_or_are_refused_by_feature(entry):
    model = build(entry)
    outcome = conversion(model, input_for(entry, batch=2))
    assert outcome.status != "failed", outcome.detail
    if entry.family in ("ViT", "DeiT-III", "ResNet"):
        assert outcome.status == "ok", outcome.detail
