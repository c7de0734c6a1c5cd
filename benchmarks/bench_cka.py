"""CKA grid of two shipped shapes models over the test scenes: streamed (vitviz.represent.cka_matrix) vs naive.

The naive version holds every layer's features of every image at once, forms each layer's centred
(n, n) Gram matrix once, then the whole-sample CKA of every pair of layers from those Grams (checked
against :func:`vitviz.represent.cka` on one pair); the streamed one keeps one batch of features per
layer and running HSIC sums. Each runs in its own process (so peak resident memory is its own),
alternating, ``--repeats`` times; the script prints time and peak memory side by side and their ratios.

    .venv/bin/python benchmarks/bench_cka.py [--a vit_shapes --b resnet_shapes --n 2000 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def centred_gram(x):
    """The (n, n) linear kernel of the column-centred features ``x`` (n, d), in float64: ||Yᵀ X||²_F = <K, L>."""
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def measure(kind: str, a: str, b: str, n: int, batch: int, rep: str, threads: int) -> dict:
    """Run one variant in this process; returns seconds, peak RSS (MiB) and the grid."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from vitviz.data import load_dataset
    from vitviz.represent import cka
    from vitviz.represent.features import layer_features
    from vitviz.represent.matrix import cka_matrix
    from vitviz.represent.subjects import load_subject, prepare

    sa, sb = (load_subject(str(ROOT / "checkpoints" / f"{m}.safetensors")) for m in (a, b))
    images = load_dataset("shapes", img_size=sa.img_size).test.images[:n]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if kind == "streamed":
        grid = cka_matrix(sa, sb, images, rep=rep, batch_size=batch).grid
    else:  # naive: every layer's features of every image, each layer's Gram once, then CKA per pair
        feats_a: list[list] = []
        feats_b: list[list] = []
        for i in range(0, n, batch):
            fa = layer_features(sa.model, prepare(sa, images[i:i + batch])).layers
            fb = layer_features(sb.model, prepare(sb, images[i:i + batch])).layers
            feats_a = feats_a or [[] for _ in fa]
            feats_b = feats_b or [[] for _ in fb]
            for k, f in enumerate(fa):
                feats_a[k].append(f.vector(rep))
            for k, f in enumerate(fb):
                feats_b[k].append(f.vector(rep))
        xa = [torch.cat(f) for f in feats_a]  # (n, d) per layer, all at once
        xb = [torch.cat(f) for f in feats_b]
        ka, kb = [centred_gram(x) for x in xa], [centred_gram(y) for y in xb]  # (n, n) each, computed once
        grid = np.array([[float((k * l_).sum() / (k.norm() * l_.norm())) for l_ in kb] for k in ka])
        check = cka(xa[-1], xb[-1])  # the reference on one pair: the Gram reuse changes no number
        if abs(check - grid[-1, -1]) > 1e-9:
            raise SystemExit(f"naive grid disagrees with vitviz.represent.cka: {grid[-1, -1]} vs {check}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mib": peak, "extra_mib": peak - base, "grid": np.asarray(grid).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", default="vit_shapes")
    p.add_argument("--b", default="resnet_shapes")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rep", default="flat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.a, args.b, args.n, args.batch_size, args.rep, args.threads)))
        return
    runs: dict[str, list[dict]] = {"streamed": [], "naive": []}
    for r in range(args.repeats):
        for kind in ("streamed", "naive") if r % 2 == 0 else ("naive", "streamed"):  # alternate: fair to drift
            cmd = [sys.executable, __file__, "--child", kind, "--a", args.a, "--b", args.b, "--n", str(args.n),
                   "--batch-size", str(args.batch_size), "--rep", args.rep, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    s, v = runs["streamed"], runs["naive"]
    ts, tn = statistics.median(x["seconds"] for x in s), statistics.median(x["seconds"] for x in v)
    ms, mn = statistics.median(x["extra_mib"] for x in s), statistics.median(x["extra_mib"] for x in v)
    import numpy as np

    diff = float(np.abs(np.array(s[0]["grid"]) - np.array(v[0]["grid"])).max())
    print(f"{args.a} vs {args.b}, {args.n} shapes test scenes, batch {args.batch_size}, '{args.rep}' features, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'':10} {'time (s)':>10} {'peak RSS growth (MiB)':>22}")
    print(f"{'streamed':10} {ts:10.2f} {ms:22.0f}")
    print(f"{'naive':10} {tn:10.2f} {mn:22.0f}")
    print(f"naive / streamed: time x{tn / ts:.2f}, memory x{mn / max(ms, 1.0):.1f}; "
          f"largest grid difference {diff:.3f} (unbiased minibatch vs biased whole-sample estimate)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "streamed": s, "naive": v}, indent=1))


if __name__ == "__main__":
    main()
