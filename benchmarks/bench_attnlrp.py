"""What AttnLRP costs on ViT-B/16 at 224 px, batch 1, CPU, next to a plain gradient and next to lxt.

Measured side by side in one run, in paired interleaved repeats (each repeat times every variant once,
in a rotating order, and divides by that repeat's gradient pass; medians of those ratios are reported,
with 95 % bootstrap intervals), so drift in a shared machine's load cancels out:

* gradient       one forward and one backward of timm's ``vit_base_patch16_224`` (random weights) to the
                 input: the cost floor of any one-pass LRP.
* vitviz         ``vitviz.explain.attnlrp.attnlrp`` on the same model (AttnLRP rules as hooks, one pass).
* lxt            lxt 2.1's own ViT rules (``lxt.efficient``, its torchvision map) on torchvision's
                 ``vit_b_16`` (random weights), relevance = input x gradient. lxt has no timm or vitviz map,
                 so this is the same architecture and size in the model lxt supports; its torchvision map uses
                 CP-LRP inside attention (no relevance through the softmax), which is less work than AttnLRP.
                 lxt patches torch.nn classes for the whole process: the benchmark switches its patches on
                 for the lxt variant only. (``import lxt.efficient`` fails with transformers 5: its BERT map
                 imports ``transformers.modeling_attn_mask_utils``; the torchvision map is loaded on its own.)

* tv-grad        one forward and one backward of that torchvision ``vit_b_16``, unpatched: lxt's own floor.

Prints each variant's median time and its ratio to timm's gradient pass, vitviz / lxt in time, and what
each tool's rules add to its own model's gradient pass (vitviz over timm's, lxt over torchvision's).

    python benchmarks/bench_attnlrp.py [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch
from torch import nn

from vitviz.explain.attnlrp import attnlrp


def input_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)  # (1, classes)
    (grad,) = torch.autograd.grad(logits.max(dim=-1).values.sum(), x)
    return (x * grad).sum(1)  # (1, H, W)


def lxt_variant(x: torch.Tensor) -> tuple[Callable[[], object], nn.Module]:
    """lxt's torchvision ViT-B/16 map, patched in only while the variant runs (and the model it runs)."""
    import lxt

    # lxt 2.1's ``lxt.efficient/__init__`` imports its BERT map, which imports a module transformers 5 no longer
    # has; bare package entries let its torchvision map (which needs only torchvision) load on its own.
    for name in ("lxt.efficient", "lxt.efficient.models"):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(lxt.__path__[0], *name.split(".")[1:])]
            sys.modules[name] = pkg
    from lxt.efficient.models.vit_torch import cp_LRP
    from torchvision.models import vision_transformer

    classes = (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)
    original = {cls: cls.forward for cls in classes}
    for target, patch in cp_LRP.items():  # what lxt.efficient.monkey_patch(vision_transformer) does
        patch(target)
    patched = {cls: cls.forward for cls in classes}
    for cls, fwd in original.items():
        cls.forward = fwd
    model = vision_transformer.vit_b_16(weights=None).eval()

    def run() -> object:
        for cls, fwd in patched.items():
            cls.forward = fwd
        try:
            return input_gradient(model, x)
        finally:
            for cls, fwd in original.items():
                cls.forward = fwd

    return run, model


def bootstrap(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    lxt_run, tv_model = lxt_variant(x)
    variants: dict[str, Callable[[], object]] = {
        "gradient": lambda: input_gradient(model, x),
        "vitviz": lambda: attnlrp(model, x),
        "tv-grad": lambda: input_gradient(tv_model, x),
        "lxt": lxt_run,
    }
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    ratios = {k: [t / g for t, g in zip(times[k], times["gradient"], strict=True)] for k in names}
    print(f"ViT-B/16 @224, batch 1, CPU, {args.threads} threads, {args.repeats} paired repeats")
    for name in names:
        lo, hi = bootstrap(ratios[name])
        print(f"  {name:9s} {statistics.median(times[name]) * 1e3:8.1f} ms   x gradient "
              f"{statistics.median(ratios[name]):.2f} [{lo:.2f}, {hi:.2f}]")
    vs = [a / b for a, b in zip(times["vitviz"], times["lxt"], strict=True)]
    lo, hi = bootstrap(vs)
    print(f"  vitviz / lxt: {statistics.median(vs):.2f} [{lo:.2f}, {hi:.2f}]")
    # what each tool's rules add to its own model's gradient pass, and the two side by side
    own = {"vitviz": "gradient", "lxt": "tv-grad"}
    over = {k: [t / g for t, g in zip(times[k], times[base], strict=True)] for k, base in own.items()}
    for k, base in own.items():
        lo, hi = bootstrap(over[k])
        print(f"  {k} x its own model's gradient ({base}): {statistics.median(over[k]):.2f} [{lo:.2f}, {hi:.2f}]")
    rel = [a / b for a, b in zip(over["vitviz"], over["lxt"], strict=True)]
    lo, hi = bootstrap(rel)
    print(f"  vitviz / lxt, each over its own model's gradient: {statistics.median(rel):.2f} [{lo:.2f}, {hi:.2f}]")


if __name__ == "__main__":
    main()
