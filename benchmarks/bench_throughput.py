"""Images per second, training and inference, for each model family, measured side by side in one run.

The models are the shipped checkpoints' architectures (``checkpoints/*.safetensors``; their training
batch size and input size), or with ``--recipes`` the ``vitviz compare`` family recipes. A training
step is what ``vitviz train`` does per batch on the device: normalise, forward, label-smoothed cross-
entropy, backward, clip, AdamW step (augmentation excluded: it is a few tensor ops). Families are
measured round-robin, step by step, so drifts in the machine's load hit all alike; medians are printed.

    python benchmarks/bench_throughput.py                       # CPU, torch's default thread count
    python benchmarks/bench_throughput.py --threads 1 --steps 20
    python benchmarks/bench_throughput.py --device cuda --amp   # bf16 autocast on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitviz.checkpoint import read_checkpoint_meta
from vitviz.config import config_from_dict
from vitviz.evaluate import autocast
from vitviz.models import build_model
from vitviz.training.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def shipped_models(folder: Path) -> list[tuple[str, str, dict, int, int]]:
    """(name, family, config dict, img_size, train batch size) of every checkpoint in ``folder``."""
    out = []
    for path in sorted(folder.glob("*.safetensors")):
        meta = read_checkpoint_meta(path)
        batch = int((meta.train_config or {}).get("batch_size", 64))
        out.append((path.stem, meta.family, meta.model_config, meta.img_size, batch))
    return out


def recipe_models(img_size: int) -> list[tuple[str, str, dict, int, int]]:
    from vitviz.compare import PRESETS, CompareSpec
    from vitviz.config import config_to_dict
    from vitviz.training import TrainConfig, resolve_model

    spec = CompareSpec(kind="models", dataset="digits", epochs=1, runs=PRESETS["data-efficiency"]["runs"],
                       img_size=img_size)
    out = []
    for run in spec.runs:
        family, model = run.name, run.model
        cfg = TrainConfig.from_dict({"model": model, "dataset": "digits", "epochs": 1, "out": "-",
                                     "img_size": img_size, **spec.settings_for(run)})
        fam, model_cfg = resolve_model(cfg, num_classes=10)
        out.append((f"{family}@{img_size}", fam, config_to_dict(model_cfg), img_size, cfg.batch_size))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    parser.add_argument("--recipes", type=int, metavar="IMG_SIZE", help="measure the compare recipes at this size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.amp else None
    models = recipe_models(args.recipes) if args.recipes else shipped_models(Path(args.checkpoints))
    if not models:
        raise SystemExit(f"no checkpoints in {args.checkpoints}; pass --recipes 32 to measure the recipes instead")

    benches = []
    for name, family, cfg, size, batch in models:
        torch.manual_seed(0)
        model = build_model(family, config_from_dict(family, cfg)).to(device)
        fmt = torch.channels_last if family in ("resnet", "hybrid") else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = make_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999), device=device)
        n_cls = model.num_classes
        xb = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        yb = torch.randint(0, n_cls, (batch,), device=device)
        xi = torch.randint(0, 256, (args.infer_batch, 3, size, size), dtype=torch.uint8, device=device)
        benches.append({"name": name, "model": model, "opt": opt, "fmt": fmt, "xb": xb, "yb": yb, "xi": xi,
                        "params": sum(p.numel() for p in model.parameters()), "size": size, "batch": batch,
                        "train": [], "infer": []})

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(b: dict) -> float:
        b["model"].train()
        sync()
        t = time.perf_counter()
        x = ((b["xb"].float() / 255.0 - 0.5) / 0.25).contiguous(memory_format=b["fmt"])  # (B, 3, H, W)
        with autocast(device, amp):
            logits = b["model"](x)
        loss = F.cross_entropy(logits.float(), b["yb"], label_smoothing=0.1)
        b["opt"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(b["model"].parameters(), 1.0)
        b["opt"].step()
        sync()
        return b["batch"] / (time.perf_counter() - t)

    @torch.no_grad()
    def infer_step(b: dict) -> float:
        b["model"].eval()
        sync()
        t = time.perf_counter()
        x = ((b["xi"].float() / 255.0 - 0.5) / 0.25).contiguous(memory_format=b["fmt"])
        with autocast(device, amp):
            b["model"](x)
        sync()
        return b["xi"].shape[0] / (time.perf_counter() - t)

    for b in benches:  # warm-up: first calls allocate and pick kernels
        train_step(b), infer_step(b)
    for _ in range(args.steps):
        for b in benches:
            b["train"].append(train_step(b))
            b["infer"].append(infer_step(b))

    print(f"device {device}, threads {torch.get_num_threads()}, amp {'bf16' if amp else 'off'}, "
          f"median of {args.steps} steps")
    print("| model | params | input | train batch | train img/s | inference img/s (batch "
          f"{args.infer_batch}) |\n|---|---|---|---|---|---|")
    for b in benches:
        print(f"| {b['name']} | {b['params'] / 1e6:.2f} M | {b['size']} px | {b['batch']} | "
              f"{statistics.median(b['train']):.0f} | {statistics.median(b['infer']):.0f} |")


if __name__ == "__main__":
    main()
