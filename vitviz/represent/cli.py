"""``vitviz represent``: compare what models represent, layer by layer (Raghu et al. 2021's analyses).

    vitviz represent --models A B ... (--dataset NAME | --images DIR) [--n N] [--n-train N]
        [--embed tsne|umap|none] [--embed-layer LAYER] --out DIR

Models are vitviz checkpoints, ``timm:NAME`` or ``hf:ID``. Writes report.md, report.json and offline
HTML figures (CKA grids of every pair, probe and logit-lens curves, embedding maps, error gallery).
Batches on the GPU when there is one; under ``torchrun`` the images are sharded over the processes
and the CKA sums added across them, so the grids equal the single-process ones.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vitviz.errors import ConfigError, VitvizError

__all__ = ["add_parser", "main", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``represent`` subcommand to ``subparsers`` (its handler is :func:`run`)."""
    p = subparsers.add_parser(
        "represent", help="compare models layer by layer: CKA grids, linear probes, logit lens, embedding maps",
        description="Compare what models represent, layer by layer: writes report.md, report.json and HTML "
                    "figures into --out.")
    _configure(p)


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="checkpoints (.safetensors), timm:NAME or hf:ID")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a vitviz dataset (see `vitviz datasets`): its test split, train for probes")
    src.add_argument("--images", metavar="DIR", help="a folder of images (class sub-folders give labels)")
    p.add_argument("--n", "--n-test", dest="n", type=int, default=2000,
                   help="test images used (default 2000, or all there are); under torchrun write --n-test, which "
                        "torchrun's own parser does not mistake for its --nnodes / --nproc-per-node")
    p.add_argument("--n-train", type=int, default=2000, help="training images for the linear probes (default 2000)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--rep", default="flat", choices=("flat", "readout", "mean"),
                   help="layer features for CKA: all tokens flattened (default), the readout, or the token mean")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--embed", default="tsne", choices=("tsne", "umap", "none"), help="embedding map method")
    p.add_argument("--embed-n", type=int, default=500, help="images in the embedding maps (default 500)")
    p.add_argument("--embed-layer", default="-1", metavar="LAYER",
                   help="the embedding maps' layer: an index into each model's layers (0 the first, -1 the last: "
                        "the default) or a layer name such as blocks.2")
    p.add_argument("--gallery", type=int, default=6, help="misclassified images per model in the gallery (0: none)")
    p.add_argument("--random-weights", action="store_true", help="timm:/hf: models with random weights")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vitviz represent``; 0 on success, 2 with one line on stderr for bad arguments or inputs."""
    try:
        return _run(args)
    except VitvizError as err:
        print(f"vitviz represent: error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m vitviz.represent.cli``."""
    p = argparse.ArgumentParser(prog="vitviz represent")
    _configure(p)
    return run(p.parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    import torch

    from vitviz.represent.report import ReportSpec, run_report
    from vitviz.represent.subjects import load_subject

    for flag, value, low in (("--n", args.n, 4), ("--n-train", args.n_train, 0), ("--batch-size", args.batch_size, 4),
                             ("--embed-n", args.embed_n, 5), ("--gallery", args.gallery, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}.")
    device, distributed = _setup(args.device)
    try:
        subjects = [load_subject(m, device, random_weights=args.random_weights) for m in args.models]
        names = [s.name for s in subjects]
        if len(set(names)) != len(names):
            for k, s in enumerate(subjects):
                s.name = f"{k}:{s.name}"
        size = max((s.img_size or 0) for s in subjects) or 224
        data = _data(args, size, subjects)
        torch.set_grad_enabled(True)  # the gallery's explanations need gradients; features run under no_grad
        spec = ReportSpec(out=Path(args.out), rep=args.rep, batch_size=args.batch_size, embed=args.embed,
                          embed_n=args.embed_n, embed_layer=_layer(args.embed_layer), gallery=args.gallery,
                          progress=args.progress)
        run_report(subjects, data, spec, log=lambda msg: print(msg, file=sys.stderr))
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _layer(text: str) -> int | str:
    """``--embed-layer``: an integer index, else a layer name."""
    try:
        return int(text)
    except ValueError:
        return text


def _setup(device: str) -> tuple[str, bool]:
    """The device of this process, joining the ``torchrun`` process group when there is one."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda:")
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local)
            return f"cuda:{local}", True
        return "cpu", True
    if device == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), False
    return device, False


def _data(args: argparse.Namespace, size: int, subjects: list):
    """The test (and train) images as uint8 at the largest input size of the models."""
    from vitviz.represent.report import Data

    if args.dataset:
        from vitviz.data import load_dataset

        ds = load_dataset(args.dataset, img_size=size)
        n = min(args.n, len(ds.test))
        m = min(args.n_train, len(ds.train))
        for s in subjects:
            if s.dataset and s.dataset != ds.name:
                print(f"vitviz represent: note: {s.name} was trained on {s.dataset}, not {ds.name}.", file=sys.stderr)
        probes = m >= 10  # fewer training images make no probe worth reporting
        return Data(name=ds.name, test=ds.test.images[:n], test_labels=ds.test.labels[:n],
                    train=ds.train.images[:m] if probes else None, train_labels=ds.train.labels[:m] if probes else None,
                    class_names=list(ds.class_names))
    return _folder(Path(args.images), size, args.n)


def _folder(root: Path, size: int, n: int):
    """Images of a folder, fitted to ``size``; labels from class sub-folders when every image is in one."""
    import numpy as np
    import torch

    from vitviz.images import fit_image, open_image
    from vitviz.represent.report import Data

    if not root.is_dir():
        raise ConfigError(f"--images {root}: not a folder of images.")
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in exts)
    files = found[:n]
    if len(files) < 4:
        raise ConfigError(f"--images {root}: found {len(files)} images; CKA needs at least 4.")
    arrays = [np.asarray(fit_image(open_image(p), size)) for p in files]  # (S, S, 3) uint8 each
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    classes = sorted({p.parent.name for p in found})  # every class folder, whichever images --n takes
    labelled = all(p.parent != root for p in found) and len(classes) > 1
    labels = torch.tensor([classes.index(p.parent.name) for p in files]) if labelled else None
    return Data(name=root.name, test=images, test_labels=labels, class_names=classes if labelled else [])


if __name__ == "__main__":
    sys.exit(main())
