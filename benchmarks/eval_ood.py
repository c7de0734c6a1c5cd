"""How well the shipped checkpoints' out-of-distribution calibration works (docs/ood.md).

    .venv/bin/python benchmarks/eval_ood.py [checkpoints/*.safetensors]

For each checkpoint and score, three Markdown tables:

1. the share of its test split that ``vitviz.ood_score`` flags (the calibration keeps 98 % of the
   validation split and its upload views, so about 2 % is expected), and whether scikit-learn's two
   sample photos (``china.jpg``, ``flower.jpg``) are flagged;
2. in-distribution images that reach the model through a resize: how many of the bundled samples the
   dashboard offers for the model's dataset are flagged (``vitviz.data.samples``: shapes scenes
   rendered at 64 px, digits at 32 px), and the share of 500 test images (digits: all 361) made at 1.25
   to 12 times the model's side and resized (``vitviz.data.uploads.upload_copies``), next to the share
   of the same images made at the model's side (×1);
3. how many of some other inputs are flagged: 32 random square crops of those two photos (16 each,
   30-100 % of the photo's height), the first 200 test images of the other shipped dataset (digits for
   a shapes model, shapes scenes for a digits model), 20 images of uniform noise, and 20 constant grey
   images (levels 0 to 255).

Scores: ``features`` is the stored calibration (the input stage and every network stage, each with
its upload views); ``no upload views`` (the same fitted on the splits alone), ``network stages``
(without the input stage) and ``energy`` are calibrated on the fly (not stored), for comparison.
Everything is preprocessed as the dashboard does (``vitviz.preprocess``: centre square, resized).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vitviz.checkpoint import load_checkpoint  # noqa: E402
from vitviz.data import load_dataset, normalize  # noqa: E402
from vitviz.data.samples import dataset_samples, load_sample, sample_kind  # noqa: E402
from vitviz.data.uploads import upload_copies, upload_views  # noqa: E402
from vitviz.images import preprocess  # noqa: E402
from vitviz.ood import calibrate, ood_score  # noqa: E402

PHOTOS = ("china.jpg", "flower.jpg")
CROPS_PER_PHOTO = 16
OTHER_DATASET = {"shapes": "digits", "digits": "shapes"}
N_OTHER, N_SYNTHETIC, N_RESIZED = 200, 20, 500
# Test images made at these multiples of the model's side and resized; at 1 they are made at the side itself
# (the same scenes or digits as the other columns, with no resize), which shows what the resize adds.
RESIZE_SCALES = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


def scores(model, cal, images, mean, std, batch=256) -> torch.Tensor:
    """Scores of uint8 images (N, 3, S, S): (N,)."""
    parts = [ood_score(model, cal, normalize(images[i : i + batch], mean, std)).scores
             for i in range(0, len(images), batch)]
    return torch.cat(parts)  # (N,)


def photo_crops(photos: list[np.ndarray], per_photo: int, seed: int = 0) -> list[Image.Image]:
    """Random square crops, 30-100 % of each photo's height, at random places (fixed seed)."""
    rng = np.random.default_rng(seed)
    crops = []
    for photo in photos:
        h, w = photo.shape[:2]
        for _ in range(per_photo):
            side = int(rng.uniform(0.3, 1.0) * min(h, w))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crops.append(Image.fromarray(photo[top : top + side, left : left + side]))
    return crops


def synthetic(size: int) -> dict[str, torch.Tensor]:
    """Uniform noise and constant grey images, uint8 (N, 3, S, S)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (N_SYNTHETIC, 3, size, size), generator=g, dtype=torch.uint8)
    levels = torch.linspace(0, 255, N_SYNTHETIC).round().to(torch.uint8)  # (N,)
    constant = levels[:, None, None, None].expand(-1, 3, size, size).clone()
    return {"noise": noise, "constant": constant}


def main(paths: list[str]) -> None:
    from sklearn.datasets import load_sample_image

    torch.set_num_threads(1)
    photos = [load_sample_image(name) for name in PHOTOS]
    crops = photo_crops(photos, CROPS_PER_PHOTO)
    datasets: dict[tuple[str, int], object] = {}

    def dataset(name: str, size: int):
        if (name, size) not in datasets:
            datasets[name, size] = load_dataset(name, img_size=size)
        return datasets[name, size]

    first = ["| checkpoint | score | test images | test flagged | china.jpg | flower.jpg |",
             "|---|---|---|---|---|---|"]
    second = ["| checkpoint | score | bundled samples | " + " | ".join(f"×{f:g}" for f in RESIZE_SCALES) + " |",
              "|---|---|---|" + "---|" * len(RESIZE_SCALES)]
    third = ["| checkpoint | score | photo crops | other dataset | uniform noise | constant grey |",
             "|---|---|---|---|---|---|"]

    def count(flags: torch.Tensor, bold_unless: bool = True) -> str:
        """k/n flagged, bold where some are not (an input that should be flagged) or, with False, where some are."""
        n, k = len(flags), int(flags.sum())
        plain = k == n if bold_unless else k == 0
        return f"{k}/{n}" if plain else f"**{k}/{n}**"

    for path in paths:
        name = f"`{Path(path).name}`"
        model, meta = load_checkpoint(path)
        if meta.ood is None:
            first.append(f"| {name} | no calibration | | | | |")
            continue
        data = dataset(meta.dataset, meta.img_size)
        train, val = data.train.images, data.val.images
        views = upload_views(meta.dataset, train, val)
        kw = {"mean": meta.mean, "std": meta.std, "keep": meta.ood["keep"]}
        cals = {
            meta.ood["method"]: meta.ood,
            "no upload views": calibrate(model, train, val, **kw),
            "network stages": calibrate(model, train, val, pixels=False, views=views, **kw),
            "energy": calibrate(model, train, val, method="energy", views=views, **kw),
        }
        other_name = OTHER_DATASET.get(meta.dataset)
        other = dataset(other_name, meta.img_size).test.images[:N_OTHER] if other_name else None
        x_photos, x_crops = preprocess(photos, meta), preprocess(crops, meta)  # (2 | 32, 3, S, S)
        samples = [n for n in dataset_samples(meta.dataset) if sample_kind(n) != "photo"]
        x_samples = preprocess([load_sample(n).image for n in samples], meta)  # (n, 3, S, S), as the dashboard
        resized = {f: upload_copies(meta.dataset, data.test.images[:N_RESIZED], round(f * meta.img_size), part="test")
                   for f in RESIZE_SCALES}  # uint8 (N_RESIZED, 3, S, S) each
        for method, cal in cals.items():
            def flags(images: torch.Tensor, cal=cal, model=model, meta=meta) -> torch.Tensor:
                return scores(model, cal, images, meta.mean, meta.std) > cal["threshold"]

            test = flags(data.test.images).double().mean().item()
            marks = ["flagged" if f else "**not flagged**" for f in ood_score(model, cal, x_photos).flagged.tolist()]
            first.append(f"| {name} | {method} | {len(data.test)} | {100 * test:.1f} % | {marks[0]} | {marks[1]} |")

            shares = [flags(images).double().mean().item() for images in resized.values()]
            cells = [count(ood_score(model, cal, x_samples).flagged, bold_unless=False)]
            cells += [f"{100 * v:.1f} %" if v <= 0.05 else f"**{100 * v:.1f} %**" for v in shares]
            second.append(f"| {name} | {method} | " + " | ".join(cells) + " |")

            cells = [count(ood_score(model, cal, x_crops).flagged)]
            cells.append("" if other is None else f"{count(flags(other))} {other_name}")
            cells += [count(flags(images)) for images in synthetic(meta.img_size).values()]
            third.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    for table in (first, second, third):
        print("\n".join(table), end="\n\n", flush=True)

if __name__ == "__main__":
    main(sys.argv[1:] or sorted(str(p) for p in (ROOT / "checkpoints").glob("*.safetensors")))
