"""Training on CPU: PyTorch's fused attention kernel vs our explicit softmax(q k^T) v, side by side.

``vitviz train --attention auto`` (the default) trains our ViTs and hybrids on the explicit path when
the model is on a CPU, and this script is the measurement behind that default. A step
is forward + label-smoothed cross-entropy + backward + gradient clipping + AdamW, on the shipped
recipes' models and batch sizes and on ViT-Ti/16 at 224 px. In each paired repeat both paths take a
few steps (in alternating order) on the same model and batch; the ratio explicit/fused of that
repeat's step times is collected, and the median ratio is printed with a 95 % bootstrap interval.

    python benchmarks/bench_attention.py [--repeats 12] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_rollout import median_interval  # the same bootstrap as the rollout benchmark

from vitviz.models import build_model, preset_config
from vitviz.models.layers import set_training_attention
from vitviz.runtime import tune_allocator
from vitviz.training.optim import make_optimizer

# name: (preset, overrides, batch) -- the shipped recipes' transformers, then a standard ViT
CASES: dict[str, tuple[str, dict, int]] = {
    "vit_shapes (32 px, 64+1 tokens, 8 heads of 12)": (
        "vit_p4_d8_32", dict(embed_dim=96, depth=6, num_heads=8, mlp_ratio=2.0, pooling="mean", num_classes=8), 32),
    "vit_digits (16 px, 16+1 tokens, 4 heads of 32)": (
        "vit_p4_d8_32", dict(img_size=16, embed_dim=128, depth=6, num_heads=4, pooling="mean"), 64),
    "hybrid_shapes (32 px, 64+1 tokens, 4 heads of 16)": (
        "hybrid_r18_vit_32", dict(backbone_layers=(1, 1, 1), backbone_width=16, embed_dim=64, depth=4,
                                  num_heads=4, pooling="mean", num_classes=8), 64),
    "ViT-Ti/16 (224 px, 196+1 tokens, 3 heads of 64)": ("vit_tiny_patch16_224", dict(num_classes=10), 8),
}


def make_step(name: str) -> tuple[Callable[[], None], torch.nn.Module]:
    """A closure running one training step of case ``name``, and its model."""
    preset, overrides, batch = CASES[name]
    torch.manual_seed(0)
    family, config = preset_config(preset, **overrides)
    model = build_model(family, config).train()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), device=torch.device("cpu"))
    size = config.vit.img_size if family == "hybrid" else config.img_size
    x = torch.randn(batch, 3, size, size)  # (B, 3, H, W)
    y = torch.randint(0, 8, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step, model


def timed_steps(step: Callable[[], None], model: torch.nn.Module, explicit: bool, steps: int) -> float:
    """Seconds per step over ``steps`` steps with the chosen attention path."""
    set_training_attention(model, "explicit" if explicit else "fused")
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench(name: str, repeats: int, steps: int) -> tuple[float, float, float, tuple[float, float]]:
    """(fused ms/step, explicit ms/step, median ratio explicit/fused, its 95 % interval)."""
    step, model = make_step(name)
    for explicit in (False, True):  # warm both paths' kernels and the allocator
        timed_steps(step, model, explicit, 2)
    fused, explicit, ratios = [], [], []
    for r in range(repeats):
        order = (False, True) if r % 2 else (True, False)  # alternate who goes first
        t = {e: timed_steps(step, model, e, steps) for e in order}
        fused.append(t[False])
        explicit.append(t[True])
        ratios.append(t[True] / t[False])
    return (1000 * statistics.median(fused), 1000 * statistics.median(explicit), statistics.median(ratios),
            median_interval(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12, help="paired repeats per model")
    parser.add_argument("--steps", type=int, default=5, help="steps per path in each repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="the two small ViTs, 3 repeats (a smoke run)")
    args = parser.parse_args()
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(CASES)[:2] if args.quick else list(CASES)
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} paired repeats "
          f"of {args.steps} steps per path")
    print("| model (batch) | fused ms/step | explicit ms/step | explicit/fused [95 % interval] |")
    print("|---|---|---|---|")
    for name in names:
        fused, explicit, ratio, (lo, hi) = bench(name, repeats, args.steps)
        print(f"| {name} (x{CASES[name][2]}) | {fused:.1f} | {explicit:.1f} | **{ratio:.3f}** "
              f"[{lo:.3f}, {hi:.3f}] |", flush=True)


if __name__ == "__main__":
    main()
