"""Which explanation to trust: every method x family on freshly generated shapes scenes, with the one scorer.

For each shipped shapes checkpoint (``checkpoints/{vit,hybrid,resnet}_shapes.safetensors``) and
``--n`` scenes rendered from a seed no model was trained on, :mod:`vitviz.explain.trust` (the scorer
``vitviz trust`` and the dashboard use) scores every saliency method of the registry that applies to
the model, explaining and tracking the true class: deletion, insertion and ROAD AUC (patch-aligned
squares: the token cell on the transformers, the stated 4-px square on the ResNet), pointing game and
mask IoU against the object masks, each beside uniform random maps' score with 95 % bootstrap
intervals, the cascading-randomisation sanity check on ``--sanity-images`` scenes, and the time per
image. The protocol is printed with every table.

One extra row, ``attention, layer L*``, scores raw attention at the layer with the best deletion AUC
on ``--select-n`` scenes of another seed (chosen there, scored here). Prints one Markdown table per
family and checks the targets: the best ViT method points inside the object on >= 80 % of scenes,
every method beats the random baseline on deletion AUC, how the best ViT method other than Chefer
relevance compares with it, and that every method's sanity check is reported.

    python benchmarks/eval_explanations.py [--n 500] [--steps 16] [--json out.json] [--skip-slow]
        [--methods a,b] [--param METHOD.NAME=NUMBER ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vitviz.checkpoint import load_checkpoint
from vitviz.data.shapes import make_shapes
from vitviz.explain import explain, methods_for
from vitviz.explain.registry import get_method
from vitviz.explain.trust import (
    markdown_table,
    merge_records,
    perturbation_scores,
    protocol_for,
    score_methods,
    summarise,
)
from vitviz.images import preprocess

EVAL_SEED = 7_000_007  # not a training, validation, test or dashboard seed
FAMILIES = ("vit", "hybrid", "resnet")
POINTING_TARGET = 80.0


def explain_all(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, method: str,
                batch_size: int, **params) -> torch.Tensor:
    """Maps (N, H, W) for every scene, explaining the true class where the method takes a target."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        kw = {"target": labels[sl]} if "target" in get_method(method).params else {}
        out.append(explain(model, x[sl], method, **kw, **params))
    return torch.cat(out)


def pick_attention_layer(model: torch.nn.Module, meta, args: argparse.Namespace) -> int:
    """The layer whose raw attention has the lowest deletion AUC on ``--select-n`` scenes of another seed.

    Raw attention is one layer's view, and which layer says most differs per model; choosing it on
    scenes that are not scored keeps the scored table honest.
    """
    images, labels_np, _ = make_shapes(args.select_n, seed=args.seed + 2, img_size=meta.img_size)
    x = preprocess(images, meta).to(args.device)
    labels = torch.from_numpy(labels_np).long().to(args.device)
    protocol = protocol_for(model, meta.img_size, meta.img_size, steps=args.steps, target="label", seed=args.seed)
    aucs = []
    for layer in range(len(model.blocks)):
        maps = explain_all(model, x, labels, "attention", args.batch_size, layer=layer)
        got = perturbation_scores(model, x, maps, labels, protocol, range(len(x)), road=False,
                                  forward_batch=args.forward_batch)
        aucs.append(float(got["deletion_auc"].mean()))
    return min(range(len(aucs)), key=aucs.__getitem__)


def method_params(items: list[str]) -> dict[str, dict[str, float]]:
    """``METHOD.NAME=NUMBER`` options as score_methods' ``params`` (e.g. attnlrp.gamma=0.25)."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not (sep and dot and method and name) or number is None:
            raise SystemExit(f"--param takes METHOD.NAME=NUMBER (e.g. attnlrp.gamma=0.25), got {item!r}")
        out.setdefault(method, {})[name] = int(number) if number.is_integer() and "." not in value else number
    return out


def flat(entry: dict, random: bool = False) -> dict[str, float]:
    """One method's (or, with ``random``, the random maps') means in the benchmark's flat form."""
    get = (lambda k: entry["metrics"][k]["random"]) if random else (lambda k: entry["metrics"][k]["mean"])
    out = {"pointing_game_pct": 100.0 * get("pointing_game"), "mask_iou": get("mask_iou"),
           "deletion_auc": get("deletion_auc"), "insertion_auc": get("insertion_auc"), "road_auc": get("road_auc")}
    if not random:
        out["ms_per_image"] = entry["ms_per_image"]
        if "sanity" in entry:
            out["sanity_spearman"] = entry["sanity"]["final"]
            out["sanity_flagged"] = entry["sanity"]["flagged"]
    return out


def evaluate_family(family: str, path: Path, args: argparse.Namespace) -> dict:
    from vitviz.explain.trust import is_slow

    model, meta = load_checkpoint(path, args.device)
    images, labels_np, masks_np = make_shapes(args.n, seed=args.seed, img_size=meta.img_size)
    x = preprocess(images, meta).to(args.device)  # (N, 3, S, S)
    labels = torch.from_numpy(labels_np).long().to(args.device)
    masks = torch.from_numpy(masks_np).to(args.device)
    with torch.no_grad():
        preds = torch.cat([model(x[i:i + args.batch_size]).argmax(-1) for i in range(0, len(x), args.batch_size)])
    methods = methods_for(model, saliency_only=True)
    if args.methods:
        methods = [m for m in methods if m in args.methods.split(",")]
    if args.skip_slow:
        methods = [m for m in methods if not is_slow(m, model, meta.img_size, meta.img_size)]
    protocol = protocol_for(model, meta.img_size, meta.img_size, steps=args.steps, target="label", seed=args.seed,
                            sanity_images=args.sanity_images)
    t0 = time.perf_counter()
    progress = (lambda msg: print(f"  {family:<7}{msg} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)) \
        if args.verbose else None
    rec = score_methods(model, x, methods=methods, protocol=protocol, labels=labels, masks=masks,
                        batch_size=args.batch_size, forward_batch=args.forward_batch, progress=progress,
                        params=method_params(args.param))
    extra = {}
    if "attention" in methods and args.select_n and hasattr(model, "blocks"):
        layer = pick_attention_layer(model, meta, args)
        name = f"attention, layer {layer}*"
        one = score_methods(model, x, methods=["attention"], protocol=protocol, labels=labels, masks=masks,
                            batch_size=args.batch_size, forward_batch=args.forward_batch,
                            params={"attention": {"layer": layer}}, sanity_indices=[])
        extra = {name: one}
    report = summarise(rec)
    result = {"checkpoint": str(path), "img_size": meta.img_size, "accuracy": float((preds == labels).float().mean()),
              "report": report, "methods": {m: flat(e) for m, e in report["methods"].items()},
              "random": flat(next(iter(report["methods"].values())), random=True)}
    for name, one in extra.items():
        rep = summarise(merge_records([one]), labels={"attention": name})
        result["methods"][name] = flat(rep["methods"]["attention"])
        result["extra_rows"] = {name: rep["methods"]["attention"]}
    print(f"  {family}: {len(methods)} methods on {args.n} scenes in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return result


def markdown(results: dict[str, dict], args: argparse.Namespace) -> str:
    """One ranked table per family (the scorer's own renderer), the accuracy and command above it."""
    parts = [f"Command: `python benchmarks/eval_explanations.py --n {args.n} --steps {args.steps}"
             + (" --skip-slow" if args.skip_slow else "") + (f" --methods {args.methods}" if args.methods else "")
             + "".join(f" --param {p}" for p in args.param)
             + f"` (scenes from seed {args.seed}, true class explained)."]
    for family, res in results.items():
        parts += ["", f"### {family} (test accuracy on these scenes {res['accuracy']:.1%})", "",
                  markdown_table(res["report"]).rstrip()]
        for name, e in res.get("extra_rows", {}).items():
            m = e["metrics"]
            parts.append(f"\nExtra row, {name}: " + ", ".join(
                f"{k} {m[k]['mean']:.3f} [{m[k]['low']:.3f}, {m[k]['high']:.3f}]" for k in m))
    return "\n".join(parts)


def check_targets(results: dict[str, dict]) -> list[str]:
    """One line per target, starting with PASS or FAIL."""
    lines = []
    if "vit" in results:
        best, m = max(results["vit"]["methods"].items(), key=lambda kv: kv[1]["pointing_game_pct"])
        ok = m["pointing_game_pct"] >= POINTING_TARGET
        lines.append(f"{'PASS' if ok else 'FAIL'}: best ViT method ({best}) points inside the object on "
                     f"{m['pointing_game_pct']:.1f} % of scenes (target >= {POINTING_TARGET:.0f} %)")
    worse = [f"{f}/{meth} ({m['deletion_auc']:.3f} vs random {res['random']['deletion_auc']:.3f})"
             for f, res in results.items() for meth, m in res["methods"].items()
             if m["deletion_auc"] >= res["random"]["deletion_auc"]]
    lines.append("PASS: every method beats its random baseline on deletion AUC" if not worse
                 else f"FAIL: not better than random on deletion AUC: {', '.join(worse)}")
    vit = results.get("vit", {}).get("methods", {})
    if "chefer" in vit:
        others = {k: v for k, v in vit.items() if k != "chefer"}
        best_del = min(others, key=lambda k: others[k]["deletion_auc"])
        best_pg = max(others, key=lambda k: others[k]["pointing_game_pct"])
        c = vit["chefer"]
        beats = (others[best_del]["deletion_auc"] < c["deletion_auc"]
                 or others[best_pg]["pointing_game_pct"] > c["pointing_game_pct"])
        lines.append(f"{'PASS' if beats else 'INFO'}: vs Chefer relevance on the ViT (deletion AUC "
                     f"{c['deletion_auc']:.3f}, pointing {c['pointing_game_pct']:.1f} %): best other deletion AUC "
                     f"{best_del} {others[best_del]['deletion_auc']:.3f}, best other pointing {best_pg} "
                     f"{others[best_pg]['pointing_game_pct']:.1f} %")
    missing = [f"{f}/{meth}" for f, res in results.items() for meth, m in res["methods"].items()
               if "sanity_spearman" not in m and not meth.endswith("*")]
    lines.append("PASS: every method's sanity check is reported" if not missing
                 else f"FAIL: no sanity check for {', '.join(missing)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="folder with {family}_shapes files")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--n", type=int, default=500, help="scenes (default 500)")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    p.add_argument("--sanity-images", type=int, default=8, help="scenes for the randomisation check (default 8)")
    p.add_argument("--skip-slow", action="store_true", help="leave out methods of many passes (RISE, occlusion, ...)")
    p.add_argument("--methods", help="comma-separated methods to score (default: every one the model supports)")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=NUMBER",
                   help="a method parameter other than its default, e.g. attnlrp.gamma=0.25 (repeatable)")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    p.add_argument("--select-n", type=int, default=100, help="scenes (another seed) to choose the raw-attention "
                   "layer on, for the extra 'attention, layer L*' row (0: no such row)")
    p.add_argument("--batch-size", type=int, default=50, help="images per explanation batch")
    p.add_argument("--forward-batch", type=int, default=256, help="images per deletion/insertion forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    from vitviz.data.datasets import SHAPES_SEEDS

    if args.seed in SHAPES_SEEDS.values():
        p.error(f"--seed {args.seed} is a training/validation/test seed; pick another.")
    results = {}
    for family in args.families:
        path = args.checkpoints / f"{family}_shapes.safetensors"
        if not path.is_file():
            print(f"skipping {family}: {path} not found", file=sys.stderr)
            continue
        results[family] = evaluate_family(family, path, args)
    if not results:
        print(f"no shapes checkpoints found in {args.checkpoints}", file=sys.stderr)
        return 1
    print(markdown(results, args))
    print()
    checks = check_targets(results)
    print("\n".join(checks))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "checks": checks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
