"""The method registry: every front end reads it, every method runs (or is refused) on every kind of model,
and the passes each method says it costs are the passes it makes."""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from test_explain_capture import tiny_timm_vit, tiny_vit
from test_explain_methods import tiny_resnet

from vitviz.errors import ExplainError
from vitviz.explain import (
    FEATURE_METHODS,
    METHOD_LABELS,
    METHOD_PARAMS,
    METHODS,
    Cost,
    explain,
    explain_details,
    get_method,
    methods_for,
    refusal,
    registry,
)
from vitviz.explain.cli import _METHODS, main

# Small settings so that every method runs in well under a second on the tiny models.
FAST = {"rise": {"n_masks": 24, "batch": 8}, "integrated-gradients": {"steps": 4}, "smoothgrad": {"samples": 3},
        "scorecam": {"batch": 8}}
NEW = ("legrad", "occlusion", "rise", "integrated-gradients", "smoothgrad", "gradcam++", "hirescam", "scorecam",
       "eigencam", "layercam")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"vit": tiny_vit(), "timm": tiny_timm_vit(), "resnet": tiny_resnet()}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_public_names_are_read_from_the_registry():
    reg = registry()
    assert METHODS == tuple(reg) == _METHODS
    assert set(NEW) <= set(METHODS)
    assert METHODS[:6] == ("attention", "rollout", "grad-rollout", "chefer", "gradcam", "similarity")
    assert {n: dict(m.params) for n, m in reg.items()} == METHOD_PARAMS
    assert {n: m.label for n, m in reg.items()} == METHOD_LABELS
    assert FEATURE_METHODS == ("similarity",)
    for name, m in reg.items():
        assert m.name == name and m.label and m.description.endswith(".")
        assert m.models in ("transformer", "any")
        assert ("target" in m.params) == m.class_specific, name  # class-specific methods take a target
        assert not m.class_specific or m.needs_head
        cost = m.cost_for()
        assert isinstance(cost, Cost) and cost.forward >= 1 and cost.backward >= 0
        module, _, fn = m.runner.partition(":")
        assert callable(getattr(importlib.import_module(module), fn)), name


def test_unknown_method_and_parameters_are_refused(models, x):
    with pytest.raises(ExplainError, match="unknown method 'nope'; choose one of attention, rollout"):
        explain(models["vit"], x, "nope")
    with pytest.raises(ExplainError, match="takes no parameter steps; it takes target, window"):
        explain(models["vit"], x, "occlusion", steps=3)
    assert refusal(models["vit"], "nope").startswith("unknown method")


@pytest.mark.parametrize("name", ["vit", "timm", "resnet"])
@pytest.mark.parametrize("method", NEW)
def test_every_new_method_runs_or_is_refused_with_a_reason(models, x, name, method):
    model = models[name]
    why = refusal(model, method)
    cnn = name == "resnet"
    assert (why is not None) == (cnn and get_method(method).models == "transformer")
    if why is not None:
        assert "CNN" in why and "use" in why
        with pytest.raises(ExplainError, match="CNN"):
            explain(model, x, method)
        assert method not in methods_for(model)
        return
    assert method in methods_for(model)
    res = explain_details(model, x, method, **FAST.get(method, {}))
    assert res.maps.shape == (2, 32, 32) and res.maps.dtype == torch.float32
    assert float(res.maps.min()) >= 0.0 and float(res.maps.max()) <= 1.0
    assert float(res.maps.amax(dim=(1, 2)).min()) == 1.0  # a real map per image, not a constant
    assert (res.target is not None) == get_method(method).class_specific
    if res.target is not None:
        assert res.target.tolist() == res.logits.argmax(-1).tolist()
    assert res.cost == get_method(method).cost_for(res.params, _ctx(model, x))


def _ctx(model, x):
    from vitviz.explain.adapters import adapter_for
    from vitviz.explain.api import cost_context

    return cost_context(adapter_for(model), x)


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_the_forward_passes_a_method_costs_are_the_ones_it_makes(models, x, name):
    """Counted as images through the model per image explained: batching changes calls, not passes."""
    model = models[name]
    images: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, inputs: images.append(int(inputs[0].shape[0])))
    try:
        for method in methods_for(model):
            if method in ("similarity", "attnlrp"):
                continue  # similarity runs forward_features / forward_head, not the model's forward
            images.clear()
            res = explain_details(model, x, method, **FAST.get(method, {}))
            passes = sum(images) / x.shape[0]
            expected = res.cost.forward
            if method == "scorecam":  # + one masked image per channel of the layer: 32 on both tiny models
                expected += 32
            assert passes == expected, (method, passes, res.cost)
    finally:
        handle.remove()


def test_cam_family_without_pytorch_grad_cam_is_refused_with_the_install_command(models, x, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytorch_grad_cam" else real(name, *a))
    model = models["resnet"]
    for method in ("gradcam++", "hirescam", "scorecam", "eigencam", "layercam"):
        why = refusal(model, method)
        assert why is not None and 'pip install -e ".[explain]"' in why and "pytorch_grad_cam" in why
        assert method not in methods_for(model)
        with pytest.raises(ExplainError, match="grad-cam"):
            explain(model, x, method)
    assert "gradcam" in methods_for(model) and "occlusion" in methods_for(model)  # ours needs nothing


def test_cli_runs_a_registry_method_with_param(tmp_path, capsys):
    from vitviz.checkpoint import save_checkpoint

    save_checkpoint(tiny_vit(), tmp_path / "vit.safetensors", class_names=list("abcde"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "rise.png"
    base = ["a.png", "--checkpoint", "vit.safetensors"]
    base = [str(tmp_path / b) if i != 1 else b for i, b in enumerate(base)]
    assert main(base + ["--method", "rise", "--param", "n_masks=16", "--param", "p_keep=0.4", "--target", "2",
                        "--out", str(out)]) == 0
    assert np.load(out.with_suffix(".npy")).shape == (32, 32)
    assert main(base + ["--method", "rise", "--param", "steps=3", "--out", str(out)]) == 2
    assert "takes no parameter 'steps'" in capsys.readouterr().err
    assert main(base + ["--method", "legrad", "--param", "target=1", "--out", str(out)]) == 2
    assert "give target with --target" in capsys.readouterr().err
    assert main(base + ["--method", "occlusion", "--layer", "1", "--out", str(out)]) == 2
    assert "--layer does not apply to --method occlusion" in capsys.readouterr().err
