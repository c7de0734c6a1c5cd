"""``vitviz trust``: which explanation to trust for a model, measured on the user's own images.

    vitviz trust (--checkpoint FILE | --model timm:NAME|hf:ID|open_clip:ARCH
                  [--pretrained-file F | --pretrained TAG | --random-weights] [--prompt TEXT ...])
        (--images DIR | --dataset NAME [--n N] [--split test]) --out DIR
        [--methods a,b,...] [--skip-slow] [--target predicted|label] [--steps 16] [--unit PX]
        [--sanity-images 8] [--bootstrap 1000] [--batch-size 16] [--device auto] [--seed 0]

Writes ``DIR/trust.md`` (the ranked table: method x metric with bootstrap intervals, random maps beside
every number, the sanity check and the cost per image), ``DIR/trust.json`` (the report and every
per-image score) and ``DIR/trust.html`` (the same, offline: no JavaScript, no network). No masks
needed. Under ``torchrun --nproc_per_node K -m vitviz trust ...`` the image batches are split over the
K processes (gloo on CPU, NCCL on GPUs) and rank 0 merges the per-image scores: the result equals a
single-process run's.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitviz.errors import ExplainError, VitvizError

__all__ = ["add_parser", "build_parser", "main", "run", "write_html"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``trust`` subcommand to ``subparsers`` (its handler is :func:`run`)."""
    p = subparsers.add_parser(
        "trust", help="which explanation to trust: every method's deletion, insertion, ROAD and sanity check",
        description="Score every explanation method of a model on your images (no masks needed) against random "
                    "maps; writes a ranked table (trust.md), trust.json and an offline trust.html into --out.")
    _configure(p)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for ``python -m vitviz.explain.trust_cli``."""
    p = argparse.ArgumentParser(prog="vitviz trust", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    return p


def _configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="a vitviz checkpoint (.safetensors)")
    src.add_argument("--model", metavar="timm:NAME|hf:ID|open_clip:ARCH",
                     help="a timm, Hugging Face or open_clip model (as vitviz explain)")
    p.add_argument("--pretrained-file", metavar="F", help="safetensors weights for --model timm:NAME or open_clip:ARCH")
    p.add_argument("--pretrained", metavar="TAG", help="open_clip weights tag, e.g. openai")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a CLIP class, as text (repeat for several): the methods are scored on these prompts "
                        "(default: vitviz's default prompts)")
    p.add_argument("--random-weights", action="store_true", help="--model with random weights (downloads nothing)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--images", metavar="DIR", help="a folder of images (PNG, JPEG, WebP, BMP, GIF, TIFF)")
    data.add_argument("--dataset", metavar="NAME", help="a vitviz dataset (see `vitviz datasets`)")
    p.add_argument("--n", type=int, default=100, help="--dataset: images to score (default 100)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="--dataset split (default test)")
    p.add_argument("--data-root", help="--dataset: folder of the dataset files")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for trust.md, trust.json and trust.html")
    p.add_argument("--methods", help="comma-separated methods (default: every saliency method the model supports)")
    p.add_argument("--skip-slow", action="store_true", help="leave out methods of many passes (RISE, occlusion, ...)")
    p.add_argument("--target", choices=("predicted", "label"), default="predicted",
                   help="class explained and tracked: the prediction (default) or the dataset label")
    p.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    p.add_argument("--unit", type=int, help="perturbation square in px (default: the patch; side/8 for a CNN)")
    p.add_argument("--sanity-images", type=int, default=8, help="images for the randomisation check (0: skip)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="images per explanation batch (default 16)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vitviz trust``; 0 on success, 2 with one line on stderr for bad arguments or inputs."""
    try:
        return _run(args)
    except VitvizError as err:
        print(f"vitviz trust: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"vitviz trust: error: {err}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m vitviz.explain.trust_cli``."""
    return run(build_parser().parse_args(argv))


# --- distributed ----------------------------------------------------------------------------------------

def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def shard(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """This process's images: a contiguous run of whole batches, so every batch is the same in any run."""
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    per, extra = divmod(len(batches), world)
    start = rank * per + min(rank, extra)
    mine = batches[start:start + per + (1 if rank < extra else 0)]
    return [i for b in mine for i in b]


# --- inputs ---------------------------------------------------------------------------------------------

def _device(name: str, local_rank: int) -> str:
    import torch

    if name == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return name


def _load_model(args: argparse.Namespace, device: str):
    """(model, size, mean, std, class names) through ``vitviz explain``'s loader."""
    from vitviz.explain.cli import _load_model as load

    ns = argparse.Namespace(checkpoint=args.checkpoint, model=args.model, pretrained_file=args.pretrained_file,
                            random_weights=args.random_weights, pretrained=args.pretrained, prompt=args.prompt,
                            device=device)
    return load(ns)


def image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (not recursive), sorted by name; ExplainError when there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ExplainError(f"--images {folder}: not a folder; give a folder of images.")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExplainError(f"--images {folder}: no images there (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return files


def _inputs(args: argparse.Namespace, size: int, mean, std, names, rank: int, world: int):
    """(x of this shard, labels or None, masks or None, its global indices, total images, names of the images)."""
    import torch

    from vitviz.images import open_image, preprocess

    if args.images:
        files = image_files(args.images)
        mine = shard(len(files), args.batch_size, rank, world)
        x = preprocess([open_image(files[i]) for i in mine], size, mean=mean, std=std) if mine else \
            torch.empty(0, 3, size, size)
        return x, None, None, mine, len(files), [files[i].name for i in mine]
    from vitviz.data import load_dataset

    if args.n < 1:
        raise ExplainError(f"--n must be a positive number of images, got {args.n}.")
    splits = load_dataset(args.dataset, img_size=size, root=args.data_root)
    split = getattr(splits, args.split)
    n = min(args.n, len(split))
    mine = shard(n, args.batch_size, rank, world)
    idx = torch.tensor(mine, dtype=torch.long)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    x = (split.images[idx].float() / 255 - m) / s  # (n, 3, S, S)
    masks = split.masks[idx] if split.masks is not None else None
    return x, split.labels[idx], masks, mine, n, [f"{args.dataset}/{args.split}/{i}" for i in mine]


# --- the run --------------------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    import torch

    from vitviz.explain.api import methods_for
    from vitviz.explain.trust import is_slow, merge_records, protocol_for, score_methods, spread, summarise

    for name in ("steps", "batch_size", "bootstrap"):
        if getattr(args, name) < 1:
            raise ExplainError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.sanity_images < 0:
        raise ExplainError(f"--sanity-images must be 0 or more, got {args.sanity_images}.")
    if args.target == "label" and args.images:
        raise ExplainError("--target label needs labels: use --dataset, or --target predicted for your own images.")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, local = _world()
    distributed = world > 1
    device = _device(args.device, local)
    if distributed:
        import torch.distributed as dist

        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend)
    try:
        model, size, mean, std, _names = _load_model(args, device)
        available = methods_for(model, saliency_only=True)
        if args.methods:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            bad = [m for m in methods if m not in available]
            if bad:
                raise ExplainError(f"--methods: {', '.join(bad)} cannot explain this model; it takes "
                                   f"{', '.join(available)}.")
        else:
            methods = available
        if args.skip_slow:
            methods = [m for m in methods if not is_slow(m, model, size, size)]
        protocol = protocol_for(model, size, size, unit=args.unit, steps=args.steps, target=args.target,
                                seed=args.seed, bootstrap=args.bootstrap, sanity_images=args.sanity_images)
        x, labels, masks, mine, total, _ = _inputs(args, size, mean, std, _names, rank, world)
        sanity = spread(range(total), protocol.sanity_images)
        dev = torch.device(device)
        progress = (lambda msg: print(f"  {msg}", file=sys.stderr)) if rank == 0 else None
        rec = score_methods(model, x.to(dev), methods=methods, protocol=protocol, labels=labels,
                            masks=None if masks is None else masks.to(dev), indices=mine, sanity_indices=sanity,
                            batch_size=args.batch_size, progress=progress) if mine else None
        if distributed:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rec)
            parts = [r for r in gathered if r is not None]
        else:
            parts = [rec]
        if rank != 0:
            return 0
        merged = merge_records(parts)
        report = summarise(merged)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        source = args.checkpoint or args.model
        data = args.images or f"{args.dataset} ({args.split}, first {total})"
        report.update(model=source, data=data, device=device, processes=world,
                      command="vitviz trust " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["trust"] else "")
        from vitviz.explain.trust import markdown_table
        from vitviz.models.clip import PromptClassifier

        classes = ""
        if isinstance(model, PromptClassifier):  # the classes scored are the prompts: say which
            report["prompts"] = list(model.prompts)
            classes = "Classes: the prompts " + "; ".join(f'"{t}"' for t in model.prompts) + ".\n\n"
        md = f"# Which explanation to trust: {source} on {data}\n\n" + classes + markdown_table(report)
        (out / "trust.md").write_text(md)
        (out / "trust.json").write_text(json.dumps({**report, "per_image": per_image(merged)}, indent=1))
        write_html(out / "trust.html", report, title=f"Which explanation to trust: {source} on {data}")
        print(md)
        print(f"wrote {out / 'trust.md'}, {out / 'trust.json'} and {out / 'trust.html'}", file=sys.stderr)
        return 0
    finally:
        if distributed:
            dist.destroy_process_group()


def per_image(rec) -> dict[str, Any]:
    """Every per-image score of a run, JSON-ready (image index order)."""
    return {"indices": rec.indices.tolist(),
            "scores": {m: {k: np.round(v, 6).tolist() for k, v in s.items()} for m, s in rec.scores.items()},
            "sanity_indices": rec.sanity_indices.tolist(), "sanity_stages": list(rec.sanity_stages),
            "sanity": {m: np.round(v, 6).tolist() for m, v in rec.sanity.items()}}


# --- the offline HTML page ---------------------------------------------------------------------------------

def _svg(report: dict[str, Any], metric: str) -> str:
    """Dot-and-whisker chart of one metric: each method's mean and interval, random's band behind them."""
    from vitviz.explain.trust import METRICS

    label, better = METRICS[metric]
    methods = list(report["methods"].values())
    rnd = report["random"][metric]
    scale = 100.0 if metric == "pointing_game" else 1.0
    hi = max([1.0, *[e["metrics"][metric]["high"] for e in methods], rnd["high"]])
    row, left, width = 22, 230, 360
    height = row * len(methods) + 30

    def px(v: float) -> float:
        return left + width * max(0.0, min(1.0, v / hi))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{height}" '
             f'role="img" aria-label="{html.escape(label)}">',
             f'<rect x="{px(rnd["low"]):.1f}" y="0" width="{max(1.0, px(rnd["high"]) - px(rnd["low"])):.1f}" '
             f'height="{height - 24}" fill="#ddd"/>',
             f'<line x1="{px(rnd["mean"]):.1f}" x2="{px(rnd["mean"]):.1f}" y1="0" y2="{height - 24}" stroke="#888" '
             'stroke-dasharray="3 3"/>']
    for i, e in enumerate(methods):
        s = e["metrics"][metric]
        y = row * i + 12
        colour = "#1a7f37" if s["beats_random"] else "#9a6700"
        parts += [f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" font-size="11">{html.escape(e["label"])}'
                  '</text>',
                  f'<line x1="{px(s["low"]):.1f}" x2="{px(s["high"]):.1f}" y1="{y}" y2="{y}" stroke="{colour}" '
                  'stroke-width="2"/>',
                  f'<circle cx="{px(s["mean"]):.1f}" cy="{y}" r="4" fill="{colour}"/>']
    parts += [f'<text x="{left}" y="{height - 6}" font-size="11">0</text>',
              f'<text x="{left + width}" y="{height - 6}" font-size="11" text-anchor="end">{hi * scale:g}</text>',
              f'<text x="{left + width / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
              f'{html.escape(label)} ({"higher" if better else "lower"} is better; grey: random maps)</text>', "</svg>"]
    return "".join(parts)


def write_html(path: str | Path, report: dict[str, Any], title: str = "Which explanation to trust") -> Path:
    """A self-contained page (no scripts, no external resources): verdict, protocol, ranked table, charts."""
    from vitviz.explain.trust import table_rows

    rows = table_rows(report)
    cols = list(rows[0]) if rows else []
    table = ("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
             + "</tbody></table>")
    charts = "".join(f"<h3>{html.escape(m)}</h3>{_svg(report, m)}" for m in report["metrics"]) if rows else ""
    errors = "".join(f"<li>{html.escape(m)}: {html.escape(w)}</li>" for m, w in report.get("errors", {}).items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;
font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 6px;text-align:left}}th{{background:#f4f4f4}}
.verdict{{font-size:1.2em;padding:.6em;background:#eef6ee;border-left:4px solid #1a7f37}}
.protocol{{color:#444;font-size:13px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="verdict">{html.escape(report["verdict"])}</p>
<p class="protocol">{report["images"]} images. {html.escape(report["protocol"]["text"])}</p>
<p class="protocol">Each cell: mean [bootstrap interval] vs the random map's mean; ✓ = beats random.</p>
{table}
{charts}
{f"<h3>Not scored</h3><ul>{errors}</ul>" if errors else ""}
</body></html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


if __name__ == "__main__":
    sys.exit(main())
