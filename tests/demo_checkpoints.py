"""Tiny, untrained checkpoints of the three families for the dashboard's tests (seconds to write).

``write_demo_checkpoints(folder)`` writes ``{vit,hybrid,resnet}_shapes.safetensors`` there, with
made-up metrics and curves (marked ``demo`` in their metadata) so every page has something to draw;
``python tests/demo_checkpoints.py FOLDER`` does the same from a shell. The shipped checkpoints in
``checkpoints/`` are the real, trained ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DEMO_MODELS = {
    # name: (preset, overrides)
    "vit": ("vit_p4_d8_32", {"depth": 2, "embed_dim": 32, "num_heads": 2}),
    "hybrid": ("hybrid_r18_vit_32", {"depth": 1, "embed_dim": 32, "num_heads": 2, "backbone_width": 8}),
    "resnet": ("resnet18_32", {"width": 8, "layers": (1, 1, 1, 1)}),
}


def write_demo_checkpoints(folder: str | Path, dataset: str = "shapes", seed: int = 0) -> list[Path]:
    """Write one tiny model per family to ``folder``; returns their paths."""
    import torch

    from vitviz import create_model, save_checkpoint
    from vitviz.data.shapes import SHAPE_CLASSES

    names = list(SHAPE_CLASSES) if dataset == "shapes" else [str(d) for d in range(10)]
    k = len(names)
    rng = np.random.default_rng(seed)
    out = []
    for i, (family, (preset, overrides)) in enumerate(DEMO_MODELS.items()):
        torch.manual_seed(seed + i)
        model = create_model(preset, num_classes=k, **overrides)
        acc = 0.95 - 0.1 * i
        cm = np.diag(rng.integers(20, 30, size=k)) + rng.integers(0, 3, size=(k, k))
        epochs = 5
        curves = [{"epoch": e + 1, "train_loss": 2.0 / (e + 1), "val_accuracy": acc * (1 - 0.5 ** (e + 1)),
                   "elapsed_s": 3.0 * (e + 1)} for e in range(epochs)]
        path = save_checkpoint(
            model, Path(folder) / f"{family}_{dataset}.safetensors", dataset=dataset, class_names=names,
            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
            metrics={"test_accuracy": acc, "test_macro_precision": acc - 0.01, "test_macro_recall": acc - 0.02,
                     "test_macro_f1": acc - 0.015},
            curves=curves, confusion_matrix=cm.tolist(), num_params=sum(p.numel() for p in model.parameters()),
            demo=True,
        )
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_demo_checkpoints(sys.argv[1] if len(sys.argv) > 1 else "demo_checkpoints"):
        print(p)
