"""What attention rollout costs next to one plain (fused) forward pass of ViT-B/16 at 224 px, batch 1.

Measured side by side in one run, in paired interleaved repeats (each repeat times every variant
once, in a rotating order, and divides by that repeat's plain forward; the median of those ratios
is reported), so drift in a shared machine's load cancels out:

* plain          ``model(x)`` under no_grad: the fused path (scaled_dot_product_attention).
* capture        ``vitviz.explain.capture_attention``: the same single pass on the explicit path.
* rollout        ``vitviz.explain.explain(model, x, "rollout")``: capture + rollout + upsample + normalise.
* rollout math   the rollout arithmetic alone (class-token row, upsample, normalise) on attention
                 captured beforehand: what rollout adds on top of capture.
* hooks (timm)   what existing tools do: switch timm's ``fused_attn`` off, forward hooks on every
                 ``attn_drop``, one forward, then the full N x N rollout product.

For our ViT and for a timm ViT-B/16 (random weights). Target: rollout <= 1.05x plain. Each median
ratio comes with a 95 % bootstrap interval (the repeats resampled): the target is met when the whole
interval lies at or below 1.05, missed when it lies above. It also checks that capture runs the model
exactly once.

    python benchmarks/bench_rollout.py [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import vitviz
from vitviz.explain import (
    attention_rollout,
    capture_attention,
    explain,
    explain_details,
    normalize_maps,
    rollout_row,
    upsample_maps,
)
from vitviz.runtime import tune_allocator

TARGET = 1.05


def hook_based_rollout(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The way of hook-based tools (e.g. vit-explain): non-fused attention + forward hooks on attn_drop."""
    attns = [b.attn for b in model.blocks]
    records: list[torch.Tensor] = []
    handles = [a.attn_drop.register_forward_hook(lambda _m, _i, out: records.append(out)) for a in attns]
    for a in attns:
        a.fused_attn = False
    try:
        with torch.no_grad():
            model(x)
        rollout = attention_rollout(records)  # (B, N, N): the full product, as those tools compute it
    finally:
        for a in attns:
            a.fused_attn = True
        for h in handles:
            h.remove()
    return rollout[:, 0, 1:]


def rollout_math(attentions: list[torch.Tensor]) -> torch.Tensor:
    """What explain adds after capture for ViT-B/16: class-token rollout row, upsample, normalise."""
    row = rollout_row(attentions)[:, 1:].reshape(1, 14, 14)  # (B, gh, gw)
    return normalize_maps(upsample_maps(row, (224, 224), (16, 16)))  # (B, H, W)


def forward_calls(model: nn.Module, fn: Callable[[], object]) -> int:
    """How many times ``model.forward`` runs inside ``fn``."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of ``values``."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def bench(name: str, model: nn.Module, variants: dict[str, Callable[[], object]], repeats: int,
          warmup: int) -> dict[str, tuple[float, float, tuple[float, float]]]:
    """Median ratio to 'plain' (with its 95 % interval) and median time (ms) of each variant."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "plain"}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        if r % 2:
            order.reverse()
        t = {n: timed(variants[n]) for n in order}
        for n in names:
            times[n].append(t[n])
            if n != "plain":
                ratios[n].append(t[n] / t["plain"])
    out = {"plain": (1.0, 1000 * statistics.median(times["plain"]), (1.0, 1.0))}
    for n in ratios:
        out[n] = (statistics.median(ratios[n]), 1000 * statistics.median(times[n]), median_interval(ratios[n]))
    print(f"\n{name}  ({repeats} paired repeats, batch 1, 224 px, {torch.get_num_threads()} threads)")
    print(f"  {'variant':<16}{'median ms':>10}{'ratio to plain':>16}   95 % interval")
    for n, (ratio, ms, (lo, hi)) in out.items():
        flag = "  (target <= 1.05x)" if n == "rollout" else ""
        print(f"  {n:<16}{ms:>10.1f}{ratio:>15.3f}x   [{lo:.3f}, {hi:.3f}]{flag}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=("ours", "timm"), default=None)
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc settings alone (the vitviz CLI and dashboard tune them)")
    args = parser.parse_args()
    tuned = False if args.default_allocator else tune_allocator()
    print(f"allocator tuned as in the vitviz CLI and dashboard (vitviz.runtime): {'yes' if tuned else 'no'}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    results = {}

    if args.only in (None, "ours"):
        ours = vitviz.create_model("vit_base_patch16_224").eval()
        assert forward_calls(ours, lambda: capture_attention(ours, x)) == 1
        attns = capture_attention(ours, x).attentions
        results["ours"] = bench("vitviz ViT-B/16", ours, {
            "plain": lambda: _plain(ours, x),
            "capture": lambda: capture_attention(ours, x),
            "rollout": lambda: explain(ours, x, "rollout"),
            "rollout math": lambda: rollout_math(attns),
        }, args.repeats, args.warmup)

    if args.only in (None, "timm"):
        import timm

        tm = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        assert all(b.attn.fused_attn for b in tm.blocks), "timm should come with fused attention"
        assert forward_calls(tm, lambda: capture_attention(tm, x)) == 1
        # same numbers both ways (compared before min-max normalisation, which magnifies float32 rounding)
        ref = explain_details(tm, x, "rollout", upsample=False).grid_maps.flatten()
        assert torch.allclose(ref, hook_based_rollout(tm, x).flatten(), rtol=1e-4, atol=1e-7)
        tm_attns = capture_attention(tm, x).attentions
        results["timm"] = bench("timm ViT-B/16 (fused attention on, as it comes)", tm, {
            "plain": lambda: _plain(tm, x),
            "capture": lambda: capture_attention(tm, x),
            "rollout": lambda: explain(tm, x, "rollout"),
            "rollout math": lambda: rollout_math(tm_attns),
            "hooks+rollout": lambda: hook_based_rollout(tm, x),
        }, args.repeats, args.warmup)
        assert all(b.attn.fused_attn and "forward" not in b.attn.__dict__ for b in tm.blocks)

    print("\ncapture runs the model once: yes (checked with a forward pre-hook)")
    for key, res in results.items():
        ratio, _, (lo, hi) = res["rollout"]
        verdict = "meets" if hi <= TARGET else "misses" if lo > TARGET else "at this noise, cannot tell if it meets"
        print(f"{key}: rollout {ratio:.3f}x plain forward, 95 % interval [{lo:.3f}, {hi:.3f}] ({verdict} the "
              f"{TARGET}x target)")
        if "hooks+rollout" in res:
            print(f"{key}: capture {res['capture'][0]:.3f}x vs hook-based {res['hooks+rollout'][0]:.3f}x")


def _plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


if __name__ == "__main__":
    main()
