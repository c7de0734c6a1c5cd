"""How well the shipped checkpoints' out-of-distribution calibration works (docs/ood.md).

    .venv/bin/python benchmarks/eval_ood.py [checkpoints/*.safetensors]

For each checkpoint: the share of its test split that ``vitviz.ood_score`` flags (the calibration
keeps 98 % of the validation split, so about 2 % is expected), and whether scikit-learn's two sample
photos (``china.jpg``, ``flower.jpg``) are flagged. For comparison, the same for the energy score
calibrated the same way on the fly (not stored). Prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vitviz.checkpoint import load_checkpoint  # noqa: E402
from vitviz.data import load_dataset, normalize  # noqa: E402
from vitviz.images import preprocess  # noqa: E402
from vitviz.ood import calibrate, ood_score  # noqa: E402

PHOTOS = ("china.jpg", "flower.jpg")


def scores(model, cal, images, mean, std, batch=256) -> torch.Tensor:
    parts = [ood_score(model, cal, normalize(images[i : i + batch], mean, std)).scores
             for i in range(0, len(images), batch)]
    return torch.cat(parts)  # (N,)


def main(paths: list[str]) -> None:
    from sklearn.datasets import load_sample_image

    torch.set_num_threads(1)
    photos = [load_sample_image(name) for name in PHOTOS]
    print("| checkpoint | score | test images | test flagged | china.jpg | flower.jpg |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        model, meta = load_checkpoint(path)
        if meta.ood is None:
            print(f"| `{Path(path).name}` | no calibration | | | | |")
            continue
        data = load_dataset(meta.dataset, img_size=meta.img_size)
        energy = calibrate(model, data.train.images, data.val.images, mean=meta.mean, std=meta.std,
                           method="energy", keep=meta.ood["keep"])
        x = preprocess(photos, meta)  # (2, 3, S, S)
        for name, cal in ((meta.ood["method"], meta.ood), ("energy", energy)):
            test = scores(model, cal, data.test.images, meta.mean, meta.std)
            flagged = (test > cal["threshold"]).double().mean().item()
            photo = ood_score(model, cal, x)
            marks = ["flagged" if f else "**not flagged**" for f in photo.flagged.tolist()]
            print(f"| `{Path(path).name}` | {name} | {len(test)} | {100 * flagged:.1f} % | {marks[0]} | {marks[1]} |")


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(str(p) for p in (ROOT / "checkpoints").glob("*.safetensors")))
