"""The CAM family (and vitviz's own Grad-CAM) against pytorch-grad-cam called directly, with the boilerplate its users
write by hand."""

from __future__ import annotations

import pytest
import timm
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from test_explain_capture import randomize, tiny_timm_vit, tiny_vit
from test_explain_methods import tiny_resnet

from vitviz.errors import ExplainError
from vitviz.explain import explain, explain_details

CLASSES = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "scorecam": ScoreCAM,
           "eigencam": EigenCAM, "layercam": LayerCAM}


def vit_reshape(t: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's README boilerplate for a ViT: drop the class token, tokens to (B, D, h, w)."""
    grid = t[:, 1:]
    side = int(grid.shape[1] ** 0.5)
    return grid.reshape(t.shape[0], side, side, t.shape[-1]).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def _reference(cls, model, layers, x, targets, reshape=None):
    cam = cls(model=model, target_layers=layers, reshape_transform=reshape)
    cam.batch_size = 8
    out = cam(input_tensor=x, targets=None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets])
    return torch.from_numpy(out)  # (B, H, W), min-max scaled and resized by pytorch-grad-cam


def _check(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # pytorch-grad-cam divides by (max + 1e-7) twice; a flat map is 0 in both
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", list(CLASSES))
@pytest.mark.parametrize("make", [tiny_timm_vit, tiny_vit])
def test_vit_maps_match_pytorch_grad_cam_on_the_last_blocks_norm1(make, method, x):
    model = make()
    targets = None if method == "eigencam" else [1, 4]
    params = {"batch": 8} if method == "scorecam" else {"target": targets} if targets else {}
    res = explain_details(model, x, method, **params if method != "scorecam" else {**params, "target": targets})
    ref = _reference(CLASSES[method], model, [model.blocks[-1].norm1], x, targets, vit_reshape)
    assert res.grid_maps.shape == (2, 4, 4) and res.cell == (8, 8)
    _check(res.maps, ref)
    assert not model.training  # left as it was


@pytest.mark.parametrize("method", list(CLASSES))
def test_vit_block_layer_is_the_hooked_block(method, x):
    model = tiny_timm_vit()
    res = explain(model, x, method, layer=0, **({"batch": 8} if method == "scorecam" else {}))
    targets = None if method == "eigencam" else model(x).argmax(-1)
    _check(res, _reference(CLASSES[method], model, [model.blocks[0].norm1], x, targets, vit_reshape))


@pytest.mark.parametrize("method", list(CLASSES))
def test_cnn_maps_match_pytorch_grad_cam_on_the_last_stage(method, x):
    ours = tiny_resnet()
    res = explain(ours, x, method, **({"batch": 8} if method == "scorecam" else {}))
    targets = None if method == "eigencam" else ours(x).argmax(-1)
    _check(res, _reference(CLASSES[method], ours, [ours.gradcam_layer], x, targets))


def test_timm_cnn_needs_no_layer_name(x):
    model = randomize(timm.create_model("resnet10t", num_classes=5), seed=3)
    for method in ("gradcam++", "layercam", "eigencam"):
        res = explain(model, x, method)
        targets = None if method == "eigencam" else model(x).argmax(-1)
        _check(res, _reference(CLASSES[method], model, [model.layer4[-1]], x, targets))


def test_training_mode_is_kept_and_headless_models_get_eigencam_only(x):
    model = tiny_timm_vit().train()
    with pytest.warns(UserWarning, match="training mode"):
        explain(model, x, "layercam")
    assert model.training
    from timm.models.vision_transformer import VisionTransformer

    headless = randomize(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                           num_classes=0))
    assert explain(headless, x, "eigencam").shape == (2, 32, 32)
    with pytest.raises(ExplainError, match="no classifier head"):
        explain(headless, x, "gradcam++")


def test_the_cam_family_installs_an_opencv_that_needs_no_gl_library():
    """pytorch-grad-cam pulls in OpenCV: the headless build, whose binaries link no libGL / X11, so the CAM family
    imports on a server with no graphics libraries."""
    import importlib.metadata as md
    import shutil
    import subprocess
    from pathlib import Path

    import cv2

    requires = " ".join(md.requires("grad-cam") or [])
    assert "opencv-python-headless" in requires, requires
    installed = {d.metadata["Name"].lower() for d in md.distributions()}
    assert "opencv-python" not in installed, "the GUI build of OpenCV (it needs libGL) is installed"
    binaries = sorted(Path(cv2.__file__).parent.glob("*.so"))
    assert binaries, "no OpenCV binary found"
    ldd = shutil.which("ldd")
    if ldd:  # what each binary loads, resolved the way the loader does
        for so in binaries:
            deps = subprocess.run([ldd, str(so)], capture_output=True, text=True, check=True).stdout
            assert not any(name in deps for name in ("libGL.", "libX11.", "libgthread")), (so, deps)
