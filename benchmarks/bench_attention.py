"""Training on CPU: PyTorch's fused attention kernel vs our explicit softmax(q k^T) v, side by side.

``vitviz train --attention auto`` (the default) trains our ViTs and hybrids on the explicit path when
the model is on a CPU, and this script is the measurement behind that default. A step is forward +
label-smoothed cross-entropy + backward + gradient clipping + AdamW, on the shipped transformers
(``checkpoints/``: their architectures and training batch sizes) and on ViT-Ti/16 at 224 px. In each
paired repeat both paths take a few steps (in alternating order) on the same model and batch; the ratio
explicit/fused of that repeat's step times is collected, and the median ratio is printed with a 95 %
bootstrap interval.

    python benchmarks/bench_attention.py [--repeats 12] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_rollout import median_interval  # the same bootstrap as the rollout benchmark
from bench_throughput import ROOT, shipped_models  # the shipped files' architectures and batch sizes

from vitviz.config import config_from_dict
from vitviz.models import build_model, preset_config
from vitviz.models.layers import set_training_attention
from vitviz.runtime import tune_allocator
from vitviz.training.optim import make_optimizer

Case = tuple[str, torch.nn.Module, int, int]  # name, model, input size, batch


def cases(folder: Path, quick: bool) -> list[Case]:
    """The shipped transformers (their recipes' batch sizes), then ViT-Ti/16 at 224 px, batch 8."""
    out: list[Case] = []
    for name, family, cfg, size, batch in shipped_models(folder):
        if family in ("vit", "hybrid"):
            torch.manual_seed(0)
            out.append((name, build_model(family, config_from_dict(family, cfg)), size, batch))
    if quick:
        return [c for c in out if c[0] in ("vit_digits", "vit_shapes")]
    torch.manual_seed(0)
    family, config = preset_config("vit_tiny_patch16_224", num_classes=10)
    return [*out, ("ViT-Ti/16", build_model(family, config), 224, 8)]


def make_step(model: torch.nn.Module, size: int, batch: int) -> Callable[[], None]:
    """A closure running one training step of ``model`` on a fixed random batch."""
    model.train()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), device=torch.device("cpu"))
    x = torch.randn(batch, 3, size, size)  # (B, 3, H, W)
    y = torch.randint(0, model.num_classes, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def timed_steps(step: Callable[[], None], model: torch.nn.Module, explicit: bool, steps: int) -> float:
    """Seconds per step over ``steps`` steps with the chosen attention path."""
    set_training_attention(model, "explicit" if explicit else "fused")
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench(case: Case, repeats: int, steps: int) -> tuple[float, float, float, tuple[float, float]]:
    """(fused ms/step, explicit ms/step, median ratio explicit/fused, its 95 % interval)."""
    _, model, size, batch = case
    step = make_step(model, size, batch)
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
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--repeats", type=int, default=12, help="paired repeats per model")
    parser.add_argument("--steps", type=int, default=5, help="steps per path in each repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="the two shipped ViTs, 3 repeats (a smoke run)")
    args = parser.parse_args()
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} paired repeats "
          f"of {args.steps} steps per path")
    print("| model (input, batch) | fused ms/step | explicit ms/step | explicit/fused [95 % interval] |")
    print("|---|---|---|---|")
    for case in cases(args.checkpoints, args.quick):
        fused, explicit, ratio, (lo, hi) = bench(case, repeats, args.steps)
        name, _, size, batch = case
        print(f"| {name} ({size} px, x{batch}) | {fused:.1f} | {explicit:.1f} | **{ratio:.3f}** [{lo:.3f}, {hi:.3f}] |",
              flush=True)


if __name__ == "__main__":
    main()
