"""Time to target accuracy of each shipped checkpoint, from the training curves stored in its metadata.

Every checkpoint carries its per-epoch curves (``meta.extra["curves"]``: validation accuracy and the
cumulative training wall time ``elapsed_s``) and its final test accuracy. This prints, per model,
the first epoch and the wall and CPU time at which validation accuracy reached the target (default: 99 % on
digits, 97 % on shapes — the shipped models' test targets), the total training time and the test
accuracy. ``--retrain`` re-runs each checkpoint's recorded training config first (into a temporary
folder, same settings) and reads the fresh curves instead, to measure this machine now.

    python benchmarks/time_to_target.py
    python benchmarks/time_to_target.py --retrain --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vitviz.checkpoint import read_checkpoint_meta

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"digits": 0.99, "shapes": 0.97}


def first_reaching(curves: list[dict], target: float) -> dict | None:
    """The first epoch row whose validation accuracy is at least ``target``."""
    return next((row for row in curves if row.get("val_accuracy", 0.0) >= target), None)


def retrain(path: Path, threads: int | None, workdir: Path) -> Path:
    from vitviz.training import TrainConfig, train

    meta = read_checkpoint_meta(path)
    settings = dict(meta.train_config or {})
    settings.update({"out": str(workdir / path.stem), "resume": False, "overwrite": True, "progress": False,
                     "stop_after": None})
    if threads is not None:
        settings["threads"] = threads
    return train(TrainConfig.from_saved(settings)).best_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    parser.add_argument("--target", type=float, help="one target validation accuracy for all (e.g. 0.98)")
    parser.add_argument("--retrain", action="store_true", help="re-train each checkpoint's recipe first")
    parser.add_argument("--threads", type=int, help="CPU threads for --retrain")
    args = parser.parse_args()
    paths = sorted(Path(args.checkpoints).glob("*.safetensors"))
    if not paths:
        raise SystemExit(f"no checkpoints in {args.checkpoints}")
    print("| checkpoint | target (val) | epoch reached | time to target: wall / CPU (s) | epochs "
          "| total train time: wall / CPU (s) | test accuracy |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            source = retrain(path, args.threads, Path(tmp)) if args.retrain else path
            meta = read_checkpoint_meta(source)
            curves = meta.extra.get("curves") or []
            target = args.target if args.target is not None else TARGETS.get(meta.dataset or "", 0.99)
            hit = first_reaching(curves, target)
            if hit:
                reached = (str(hit["epoch"]), f"{hit['elapsed_s']:.0f} / {hit.get('cpu_s', float('nan')):.0f}")
            else:
                reached = ("not reached", "-")
            wall = meta.extra.get("train_time_s", float("nan"))
            cpu = meta.extra.get("cpu_time_s", float("nan"))
            test = (meta.metrics or {}).get("test_accuracy")
            print(f"| {path.stem} | {100 * target:.0f} % | {reached[0]} | {reached[1]} | {len(curves)} | "
                  f"{wall:.0f} / {cpu:.0f} | {'-' if test is None else f'{100 * test:.2f} %'} |")


if __name__ == "__main__":
    main()
