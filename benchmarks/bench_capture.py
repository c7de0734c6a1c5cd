"""What explaining costs next to one plain forward pass, on timm families and a Hugging Face ViT, as a user runs it.

A plain Python process (glibc's allocator as it comes: ``vitviz.runtime.tune_allocator`` is NOT
called), batch 1, random weights, paired interleaved repeats (each repeat times every variant once,
in a rotating order, and divides by that repeat's plain forward; medians with 95 % bootstrap
intervals), so drift in a shared machine's load cancels out.

Per model:

* plain      ``model(x)`` under no_grad, fused attention as timm ships it (SDPA for the Hugging Face ViT-B/16,
             ``hf-vit``, as transformers loads it; capture switches it to the eager path for its call only);
* capture    ``capture_attention(model, x)``: every layer's attention, one forward pass;
* hf-eager   (Hugging Face models) capture on transformers' own eager attention instead of vitviz's
             recording attention (which scales q rather than the scores), every weight kept the same way;
* rollout    ``explain(model, x, "rollout")``: capture (heads fused as the layers run) + rollout +
             upsample + normalise. Target, for capture and rollout alike: <= 1.05x plain (a verdict
             each). On Swin, whose token grid changes between stages, rollout is refused and the raw
             attention map of the last layer stands in.

On ViT-B/16 it also times the gradient methods against the code others wrote, same map:

* Grad-CAM   ours vs pytorch-grad-cam's ``GradCAM`` on ``blocks[-1].norm1`` with the usual reshape;
* Chefer     ours vs the reference rule as Chefer et al.'s code computes it: hooks keep every
             layer's attention and its gradient, then ``R = R + Ā R`` with full N x N matrices.

Every variant's map is checked against its reference before timing. Capture is checked to run
the model exactly once on every family.

    python benchmarks/bench_capture.py [--repeats 30] [--threads N] [--tuned-allocator]
        [--only vit,eva02,swin,dinov2,eva02-s,dinov2-s,hf-vit]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rollout import forward_calls, median_interval, timed  # noqa: E402

from vitviz.explain import capture_attention, explain, explain_details, normalize_maps  # noqa: E402

TARGET = 1.05
# Base-size models beside ViT-B/16, and the small EVA-02 / DINOv2 too: the explicit attention path's
# share of the time grows with tokens per channel (N / D), so small models pay relatively more.
MODELS = {
    "vit": ("vit_base_patch16_224", {}),
    "eva02": ("eva02_base_patch14_224", {}),
    "swin": ("swin_tiny_patch4_window7_224", {}),
    "dinov2": ("vit_base_patch14_reg4_dinov2", {"img_size": 224}),
    "eva02-s": ("eva02_small_patch14_224", {}),
    "dinov2-s": ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
    "hf-vit": ("transformers ViTForImageClassification, ViT-B/16 config", {}),
}


def build(key: str) -> nn.Module:
    """The benchmark's model for ``key``, random weights, eval mode."""
    torch.manual_seed(0)
    if key == "hf-vit":
        import transformers

        from vitviz.models.hf import HFImageModel

        hf = transformers.ViTForImageClassification(transformers.ViTConfig()).eval()  # ViT-B/16, 224 px, SDPA
        return HFImageModel(hf, source="ViT-B/16 config", output="logits",
                            preprocessing={"mean": (0.5,) * 3, "std": (0.5,) * 3, "img_size": 224}).eval()
    import timm

    name, kw = MODELS[key]
    return timm.create_model(name, pretrained=False, **kw).eval()


def paired(variants: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, tuple]:
    """Median ratio to 'plain' with its 95 % interval, and median ms, of each variant."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            times[n].append(timed(variants[n]))
    out = {}
    for n in names:
        ratios = [t / p for t, p in zip(times[n], times["plain"], strict=True)]
        out[n] = (statistics.median(ratios), 1000 * statistics.median(times[n]), median_interval(ratios))
    return out


def verdict(lo: float, hi: float) -> str:
    """Met when the whole 95 % interval is at or below the target, missed when all of it is above."""
    return "meets" if hi <= TARGET else "misses" if lo > TARGET else "cannot tell at this noise whether it meets"


def pair_ratio(ours: list[float], theirs: list[float]) -> tuple[float, tuple[float, float]]:
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return statistics.median(ratios), median_interval(ratios)


def plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def capture_on_transformers_eager(model: nn.Module, x: torch.Tensor) -> object:
    """``capture_attention`` with transformers' own eager attention where vitviz's recording attention runs."""
    from vitviz.explain.adapters import hf_common

    own = hf_common._implementation
    hf_common._implementation = lambda: "eager"
    try:
        return capture_attention(model, x)
    finally:
        hf_common._implementation = own


# --- the code others wrote ---------------------------------------------------------------------------

def reference_chefer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s rule as their code runs it: hooks save attention and its gradient, full N x N relevance."""
    attns, grads, handles = [], [], []
    blocks = model.blocks

    def keep(_m: nn.Module, inputs: tuple, _out: object) -> None:
        a = inputs[0]
        a.register_hook(grads.append)
        attns.append(a)

    for b in blocks:
        b.attn.fused_attn = False
        handles.append(b.attn.attn_drop.register_forward_hook(keep))
    try:
        logits = model(x)
        model.zero_grad()
        logits[0, logits[0].argmax()].backward()
    finally:
        for b in blocks:
            b.attn.fused_attn = True
        for h in handles:
            h.remove()
    grads = grads[::-1]  # backward hooks fire last layer first
    n = attns[0].shape[-1]
    r = torch.eye(n)
    for a, g in zip(attns, grads, strict=True):
        cam = (g * a.detach()).clamp(min=0).mean(dim=1)[0]  # (N, N)
        r = r + cam @ r
    return r[0, 1:].reshape(1, 14, 14)


def pytorch_grad_cam(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from pytorch_grad_cam import GradCAM

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].reshape(t.shape[0], 14, 14, t.shape[-1]).permute(0, 3, 1, 2)

    with GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=None))  # (B, H, W), resized with OpenCV, normalised


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", default=",".join(MODELS))
    p.add_argument("--tuned-allocator", action="store_true",
                   help="call vitviz.runtime.tune_allocator() first, as the CLI and the dashboard do")
    args = p.parse_args()
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = False
    if args.tuned_allocator:
        from vitviz.runtime import tune_allocator

        tuned = tune_allocator()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          + ("allocator tuned (vitviz.runtime.tune_allocator, as the CLI and the dashboard run)" if tuned
             else "allocator untuned (a plain library process)"))
    summary = []
    for key in args.only.split(","):
        name, _ = MODELS[key]
        model = build(key)
        assert forward_calls(model, lambda m=model: capture_attention(m, x)) == 1, "capture must run once"
        method = "rollout" if key != "swin" else "attention"
        variants = {
            "plain": lambda m=model: plain(m, x),
            "capture": lambda m=model: capture_attention(m, x),
            method: lambda m=model, me=method: explain(m, x, me),
        }
        if key.startswith("hf-"):
            variants["hf-eager"] = lambda m=model: capture_on_transformers_eager(m, x)
        res = paired(variants, args.repeats, args.warmup)
        print(f"\n{key}: {name}  ({args.repeats} paired repeats, batch 1, 224 px)")
        print(f"  {'variant':<12}{'median ms':>10}{'ratio to plain':>16}   95 % interval")
        for n, (ratio, ms, (lo, hi)) in res.items():
            print(f"  {n:<12}{ms:>10.1f}{ratio:>15.3f}x   [{lo:.3f}, {hi:.3f}]")
        for variant in ("capture", method):  # both against the same target: capture keeps every full weight
            ratio, _, (lo, hi) = res[variant]
            summary.append(f"{key}: {variant} {ratio:.3f}x plain [{lo:.3f}, {hi:.3f}]: {verdict(lo, hi)} the "
                           f"{TARGET}x target")

        if key == "vit":
            summary += gradient_methods(model, x, args.repeats, args.warmup)
    print()
    print("\n".join(summary))


def gradient_methods(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> list[str]:
    """Ours vs the reference tools' time for the same map, ViT-B/16, paired."""
    ours_chefer = explain_details(model, x, "chefer", upsample=False).grid_maps
    ref = reference_chefer(model, x)
    torch.testing.assert_close(normalize_maps(ours_chefer), normalize_maps(ref), atol=1e-4, rtol=1e-3)
    lines = []
    variants = {"chefer": (lambda: explain(model, x, "chefer"), lambda: reference_chefer(model, x))}
    try:
        ours_cam = explain(model, x, "gradcam")
        theirs_cam = pytorch_grad_cam(model, x)
        r = torch.corrcoef(torch.stack([ours_cam.flatten(), theirs_cam.flatten().float()]))[0, 1]
        print(f"\nGrad-CAM map vs pytorch-grad-cam: Pearson r = {float(r):.6f}")
        variants["gradcam"] = (lambda: explain(model, x, "gradcam"), lambda: pytorch_grad_cam(model, x))
    except ImportError:
        lines.append("gradcam: pytorch-grad-cam is not installed (pip install grad-cam); not compared")
    for name, (ours, theirs) in variants.items():
        for fn in (ours, theirs):
            for _ in range(warmup):
                fn()
        a, b = [], []
        for r in range(repeats):
            pair = [(a, ours), (b, theirs)] if r % 2 else [(b, theirs), (a, ours)]
            for store, fn in pair:
                store.append(timed(fn))
        ratio, (lo, hi) = pair_ratio(a, b)
        who = "pytorch-grad-cam" if name == "gradcam" else "the reference rule"
        ms_a, ms_b = 1000 * statistics.median(a), 1000 * statistics.median(b)
        lines.append(f"vit {name}: ours {ms_a:.0f} ms vs {who} {ms_b:.0f} ms = {ratio:.3f}x [{lo:.3f}, {hi:.3f}] "
                     "(target <= 1.0)")
    return lines


if __name__ == "__main__":
    main()
