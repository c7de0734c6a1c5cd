"""A model shared by threads (the dashboard's sessions share one loaded copy): the hooks one thread puts on
for its call never act in another thread's forward pass, even while they are on the module."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from vitviz.explain.adapters import adapter_for
from vitviz.explain.attnlrp import lrp_rules


def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2, num_classes=4).eval()


def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def while_on(context: Callable, inside: Callable[[object], object], meanwhile: Callable[[], object]) -> tuple:
    """Run ``meanwhile()`` in this thread while another thread is inside ``context()`` (its hooks on), then let
    the other thread run ``inside(ctx)``; returns (meanwhile's result, inside's result). No timing: events."""
    entered, done, out = threading.Event(), threading.Event(), {}

    def worker() -> None:
        with context() as ctx:
            entered.set()
            assert done.wait(60)
            out["inside"] = inside(ctx)

    t = threading.Thread(target=worker)
    t.start()
    assert entered.wait(60)
    try:
        theirs = meanwhile()
    finally:
        done.set()
        t.join(60)
    return theirs, out["inside"]


def test_another_threads_forward_is_not_recorded():
    model, images = tiny_vit(), x()
    adapter = adapter_for(model)

    def inside(rec) -> tuple[int, int]:
        before = len(rec.records)  # the other thread's forward ran while these hooks were on
        model(images)
        return before, len(rec.records)

    with torch.no_grad():
        theirs, (before, after) = while_on(lambda: adapter.recording(16, 16), inside, lambda: model(images))
        plain = model(images)
    assert (before, after) == (0, 3)  # only this thread's own forward: one record per block
    torch.testing.assert_close(theirs, plain)


def input_gradient(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    images = images.clone().requires_grad_(True)
    logits = model(images)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), images)
    return grad


def test_another_threads_gradient_does_not_follow_attnlrp_rules():
    model, images = tiny_vit(), x()
    plain = input_gradient(model, images)
    with lrp_rules(model):
        modified = input_gradient(model, images)
    assert not torch.allclose(modified, plain, rtol=1e-3, atol=1e-6)  # the rules do change a gradient ...
    theirs, ours = while_on(lambda: lrp_rules(model), lambda _: input_gradient(model, images),
                            lambda: input_gradient(model, images))
    torch.testing.assert_close(theirs, plain)  # ... but not another thread's, while they are on
    torch.testing.assert_close(ours, modified)  # and still this thread's


def test_two_recordings_at_once_take_turns_and_both_see_every_block():
    # A recording switches timm's fused attention off for its duration. Were two to overlap, the first to
    # leave would switch it back on under the second, whose forward would then record nothing.
    model, images = tiny_vit(), x()
    adapter = adapter_for(model)
    first_in, first_out, counts = threading.Event(), threading.Event(), {}

    def first() -> None:
        with adapter.recording(16, 16) as rec:
            first_in.set()
            model(images)
            counts["first"] = len(rec.records)
        first_out.set()

    def second() -> None:
        assert first_in.wait(60)
        with adapter.recording(16, 16) as rec:
            assert first_out.wait(60)  # the first has left: its switches are undone
            model(images)
            counts["second"] = len(rec.records)

    with torch.no_grad():
        threads = [threading.Thread(target=second), threading.Thread(target=first)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert counts == {"first": 3, "second": 3}


def test_an_open_clip_recording_ignores_another_threads_forward():
    # open_clip's attention is torch's nn.MultiheadAttention: the recording replaces its forward for the call
    from test_clip_prompts import ARCH, PROMPTS, SIZE, TINY

    import vitviz

    torch.manual_seed(0)
    model = vitviz.create_model(f"open_clip:{ARCH}", prompts=PROMPTS, **TINY)
    adapter = adapter_for(model)
    size = SIZE
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))

    def inside(rec) -> tuple[int, int]:
        before = len(rec.records)
        model(images)
        return before, len(rec.records)

    with torch.no_grad():
        theirs, (before, after) = while_on(lambda: adapter.recording(size, size), inside, lambda: model(images))
        plain = model(images)
    assert (before, after) == (0, adapter.depth())
    torch.testing.assert_close(theirs, plain)
