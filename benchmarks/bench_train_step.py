"""Training-step speed: our models vs timm's identical ones, interleaved in one process.

A step is forward + cross-entropy + backward + AdamW update. Both models start from the same weights
(ours is converted from timm's), take the same batch, and alternate step by step so that drift in the
machine's load hits both alike. Prints medians and the ratio timm/ours (>= 1.0: ours at least as fast).

    python benchmarks/bench_train_step.py                # ViT-S/16 @ 224 and ResNet-50 @ 224
    python benchmarks/bench_train_step.py --quick        # smaller inputs, fewer steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from vitviz.models import from_timm


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def compare(name: str, kwargs: dict, size: int, batch: int, steps: int, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, **kwargs).train()
    ours = from_timm(theirs).train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, theirs.num_classes, (batch,))
    step_ours, step_theirs = make_step(ours, x, y), make_step(theirs, x, y)
    for _ in range(warmup):
        step_ours(), step_theirs()
    t_ours, t_theirs = [], []
    for i in range(steps):
        # alternate who goes first, so neither always runs on a warmer cache
        if i % 2:
            t_ours.append(step_ours())
            t_theirs.append(step_theirs())
        else:
            t_theirs.append(step_theirs())
            t_ours.append(step_ours())
    pairs = [t / o for o, t in zip(t_ours, t_theirs, strict=True)]
    return {
        "model": f"{name} @{size} x{batch}",
        "ours_ms": 1e3 * statistics.median(t_ours),
        "timm_ms": 1e3 * statistics.median(t_theirs),
        "ratio": statistics.median(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and few steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        cases = [("vit_small_patch16_224", dict(img_size=96), 96, 8), ("resnet50", {}, 96, 8)]
        steps = args.steps or 6
    else:
        cases = [("vit_small_patch16_224", {}, 224, 16), ("resnet50", {}, 224, 16)]
        steps = args.steps or 20
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, "
          f"{steps} paired steps")
    print("| model | ours ms/step | timm ms/step | timm/ours (>=1: ours as fast) |")
    print("|---|---|---|---|")
    for name, kwargs, size, batch in cases:
        r = compare(name, kwargs, size, batch, steps)
        print(f"| {r['model']} | {r['ours_ms']:.0f} | {r['timm_ms']:.0f} | {r['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
