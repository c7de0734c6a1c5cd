"""Add an out-of-distribution calibration (``meta.ood``, see ``vitviz.ood``) to existing checkpoints.

    .venv/bin/python docs/calibrate_ood.py checkpoints/*.safetensors

Each checkpoint is calibrated on the dataset it was trained on (its training split for the
Gaussians, its validation split for the threshold), both as they are and as upload copies (made at
1.25-8 times the model's side and resized, ``vitviz.data.uploads.upload_views``), and its header is
rewritten in place. Nothing is
retrained: the tensor bytes are hashed before and after, and the script stops with an error if they
differ. ``vitviz train`` writes the calibration itself; this is for checkpoints written without it.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vitviz.checkpoint import load_checkpoint, update_checkpoint_meta  # noqa: E402
from vitviz.data import load_dataset  # noqa: E402
from vitviz.data.uploads import upload_views  # noqa: E402
from vitviz.ood import DEFAULT_KEEP, calibrate  # noqa: E402


def tensor_digest(path: Path) -> str:
    """SHA-256 of a safetensors file's tensor data (everything after the header)."""
    with open(path, "rb") as fp:
        (n,) = struct.unpack("<Q", fp.read(8))
        fp.seek(8 + n)
        h = hashlib.sha256()
        while chunk := fp.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--keep", type=float, default=DEFAULT_KEEP, help="share of validation images kept")
    parser.add_argument("--method", default="features", choices=("features", "energy"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for path in args.paths:
        before = tensor_digest(path)
        model, meta = load_checkpoint(path)
        data = load_dataset(meta.dataset, img_size=meta.img_size)
        views = upload_views(meta.dataset, data.train.images, data.val.images)
        cal = calibrate(model, data.train.images, data.val.images, mean=meta.mean, std=meta.std,
                        method=args.method, keep=args.keep, views=views)
        update_checkpoint_meta(path, ood=cal)
        after = tensor_digest(path)
        if after != before:
            raise SystemExit(f"{path}: the tensor bytes changed ({before} -> {after})")
        print(f"{path}: {cal['method']} calibration, threshold {cal['threshold']:.3f} keeps {cal['keep']:.0%} of "
              f"{cal['num_val']} validation images (views: {', '.join(cal['views'])}); tensor bytes unchanged "
              f"(sha256 {after[:16]}…)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
