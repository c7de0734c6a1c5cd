"""Glue between the vitviz package and the Streamlit dashboard: plain Python and numpy, no Streamlit.

The dashboard's pages read widgets, call these helpers and the package, and render figures. What
lives here is bookkeeping the pages would otherwise repeat: finding checkpoints in a folder (and
saying why a file is unusable), describing a model in one line, turning metrics into table rows,
the patch grid a click on the image maps to, and the bytes of downloads. Nothing here imports
Streamlit, so all of it is testable without a browser (``tests/test_dashboard_support.py``).

The bundled samples (:mod:`vitviz.data.samples`), ``fit_mask`` (:mod:`vitviz.images`) and the
prediction helpers (:mod:`vitviz.evaluate`) live in the package; the pages reach them through here.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitviz.data.samples import (  # noqa: F401  (the pages' one import for the samples they offer)
    PHOTOS,
    Sample,
    dataset_images,
    dataset_samples,
    default_sample,
    load_sample,
    sample_kind,
    sample_names,
    sklearn_image_dir,
)
from vitviz.errors import VitvizError
from vitviz.evaluate import predict_proba, topk  # noqa: F401
from vitviz.images import fit_mask, nearest_resize  # noqa: F401

__all__ = [
    "FAMILY_LABELS",
    "CheckpointEntry",
    "ModelInfo",
    "Sample",
    "accuracy_rows",
    "bytes_digest",
    "confusion_of",
    "curve_metrics",
    "clicked_patch",
    "colour_maps",
    "dataset_images",
    "dataset_samples",
    "default_sample",
    "download_stem",
    "drop_empty_columns",
    "checkpoint_info",
    "curves_of",
    "faithfulness_row",
    "fit_mask",
    "folder_fingerprint",
    "load_sample",
    "map_to_csv",
    "map_to_npy",
    "metric",
    "metrics_rows",
    "params_key",
    "overlay_png_bytes",
    "patch_centres",
    "peak",
    "point_to_patch",
    "read_results",
    "short_name",
    "predict_proba",
    "sample_names",
    "scan_checkpoints",
    "summarise_faithfulness",
    "thumbnail",
    "timm_info",
    "topk",
    "attention_depth",
    "nearest_resize",
    "transformer_dims",
]

FAMILY_LABELS = {"vit": "ViT", "hybrid": "Hybrid (ResNet→ViT)", "resnet": "ResNet",
                 "hierarchical": "Hierarchical transformer", "cnn": "CNN"}
FAMILY_ORDER = {"vit": 0, "hybrid": 1, "resnet": 2}
MAX_CHECKPOINTS = 200  # files listed per folder; a folder with more is probably not a checkpoint folder
# Listed in a folder: vitviz checkpoints, and PyTorch files people keep next to them (shown as unusable,
# with the reason: vitviz never unpickles).
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


# --------------------------------------------------------------------------------------------------
# models: what the dashboard knows about one model, whatever its source


@dataclass(frozen=True)
class ModelInfo:
    """Everything a page needs to know about a loaded model besides the module itself."""

    key: str  # stable cache key: changes when the file changes
    label: str  # what the user sees, e.g. "vit_shapes.safetensors — ViT · shapes"
    source: str  # "checkpoint" | "timm"
    family: str  # "vit" | "hybrid" | "resnet"
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    dataset: str | None = None
    path: str | None = None
    metrics: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    extra: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    train_config: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    has_head: bool = True  # False for a headless model (DINOv2, CLIP towers, num_classes=0): it returns features
    token_attention: bool | None = None  # whether attention can be recorded; None: decided by the family
    ood: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)  # vitviz.ood calibration
    # What vitviz train recorded (CheckpointMeta's typed fields); empty / None for other models
    curves: tuple[Mapping[str, Any], ...] = field(default=(), compare=False, hash=False)
    confusion_matrix: tuple[tuple[int, ...], ...] | None = field(default=None, compare=False, hash=False)
    num_params: int | None = None
    train_time_s: float | None = None
    prompts: bool = False  # True for a CLIP over typed prompts: the classes are the user's texts

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)

    @property
    def has_attention(self) -> bool:
        """Whether the model has token attention to show (ViTs, hybrids, other adapted transformers)."""
        return self.token_attention if self.token_attention is not None else self.family in ("vit", "hybrid")


@dataclass(frozen=True)
class CheckpointEntry:
    """One ``.safetensors`` file of a folder: its metadata, or why it cannot be used."""

    path: str
    name: str
    mtime_ns: int
    size: int
    meta: Any = field(default=None, compare=False, hash=False)  # CheckpointMeta when usable
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.error is None

    @property
    def key(self) -> str:
        return f"ckpt:{self.path}:{self.mtime_ns}:{self.size}"

    @property
    def label(self) -> str:
        stem = Path(self.name).stem
        if not self.usable:
            return f"{self.name} — unusable"
        meta = self.meta
        parts = [FAMILY_LABELS.get(meta.family, meta.family)]
        if meta.dataset:
            parts.append(str(meta.dataset))
        acc = _metric(meta.metrics, "test_accuracy")
        acc = acc if acc is not None else _metric(meta.metrics, "accuracy")
        if acc is not None:
            parts.append(f"{100 * acc:.1f} % test acc.")
        return f"{stem} — {' · '.join(parts)}"


def display_path(folder: str | os.PathLike) -> str:
    """``folder`` as a person reads it: relative to the working directory when inside it, else as given."""
    path = Path(folder).expanduser()
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def folder_fingerprint(folder: str | os.PathLike) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime_ns, size) of the checkpoint-like files in ``folder``: a cache key that changes with them."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return ()
    out = []
    try:
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())
        for p in files[:MAX_CHECKPOINTS]:
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((p.name, st.st_mtime_ns, st.st_size))
    except OSError:
        return ()
    return tuple(out)


def scan_checkpoints(folder: str | os.PathLike) -> list[CheckpointEntry]:
    """Read the metadata of every checkpoint-like file in ``folder`` (not recursive, at most 200).

    A file that is not a usable vitviz checkpoint is listed with its reason, never raised: one bad
    file in a user's folder must not hide the good ones. Ordered ViT, hybrid, ResNet (shapes models
    first within a family, then by dataset and name); unusable files last.
    """
    from vitviz.checkpoint import read_checkpoint_meta

    root = Path(folder).expanduser()
    entries = []
    for name, mtime_ns, size in folder_fingerprint(root):
        path = root / name
        try:
            meta, error = read_checkpoint_meta(path), None
        except VitvizError as err:
            meta, error = None, str(err)
        except Exception as err:  # a damaged file can surprise any parser; say so rather than crash
            meta, error = None, f"{path} could not be read ({type(err).__name__}: {err})."
        entries.append(CheckpointEntry(str(path), name, mtime_ns, size, meta, error))

    def order(e: CheckpointEntry) -> tuple:
        if not e.usable:
            return (1, 99, True, "", e.name)
        dataset = str(e.meta.dataset or "")
        # ViTs first (the first is the default model), and shapes first: its scenes carry object masks.
        return (0, FAMILY_ORDER.get(e.meta.family, 9), dataset != "shapes", dataset, e.name)

    return sorted(entries, key=order)


def checkpoint_info(entry: CheckpointEntry, meta: Any = None) -> ModelInfo:
    """A :class:`ModelInfo` for a usable checkpoint entry (``meta`` defaults to the entry's)."""
    meta = meta if meta is not None else entry.meta
    n = meta.num_classes
    names = tuple(meta.class_names) if meta.class_names else tuple(f"class {i}" for i in range(n))
    return ModelInfo(
        key=entry.key, label=entry.label, source="checkpoint", family=meta.family, img_size=int(meta.img_size),
        mean=tuple(meta.mean), std=tuple(meta.std), class_names=names, dataset=meta.dataset, path=entry.path,
        metrics=meta.metrics, extra=meta.extra, train_config=meta.train_config, ood=getattr(meta, "ood", None),
        curves=tuple(meta.curves),
        confusion_matrix=None if meta.confusion_matrix is None else tuple(tuple(r) for r in meta.confusion_matrix),
        num_params=meta.num_params, train_time_s=meta.train_time_s,
    )


def timm_info(name: str, family: str, pretrained: bool, preprocessing: Mapping[str, Any], num_classes: int,
              pretrained_file: str | None = None) -> ModelInfo:
    """A :class:`ModelInfo` for ``timm:<name>``; ImageNet class names when it has 1000 outputs."""
    names: tuple[str, ...] = tuple(f"class {i}" for i in range(num_classes))
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            names = tuple(info.index_to_description(i).split(",")[0] for i in range(1000))
        except Exception:  # class names are a nicety; never a reason to refuse a model
            pass
    weights = "pretrained" if pretrained or pretrained_file else "random weights"
    return ModelInfo(
        key=f"timm:{name}:{weights}:{pretrained_file or ''}", label=f"timm:{name} ({weights})", source="timm",
        family=family, img_size=int(preprocessing["img_size"]), mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]), class_names=names, dataset="imagenet" if pretrained else None,
    )


def _metric(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    if not metrics:
        return None
    value = metrics.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def metric(info: ModelInfo, name: str) -> float | None:
    """A test metric of a checkpoint: ``test_<name>`` as ``vitviz train`` writes it, or plain ``<name>``."""
    return _metric(info.metrics, f"test_{name}") if _metric(info.metrics, f"test_{name}") is not None \
        else _metric(info.metrics, name)


def short_name(info: ModelInfo) -> str:
    return Path(info.path).stem if info.path else info.label


def metrics_rows(infos: Iterable[ModelInfo]) -> list[dict[str, Any]]:
    """One table row per model: family, dataset, input, test accuracy and macro precision / recall / F1 (in %)."""
    rows = []
    for info in infos:
        row: dict[str, Any] = {"Model": short_name(info), "Family": info.family_label,
                               "Dataset": info.dataset or "—", "Input": f"{info.img_size}×{info.img_size}"}
        for key, title in (("accuracy", "Accuracy %"), ("macro_precision", "Macro precision %"),
                           ("macro_recall", "Macro recall %"), ("macro_f1", "Macro F1 %")):
            v = metric(info, key)
            row[title] = None if v is None else round(100 * v, 2)
        params = info.num_params
        row["Parameters"] = None if params is None else (f"{params / 1e6:.2f} M" if params >= 1e5
                                                         else f"{int(params):,}")
        secs = info.train_time_s
        row["Train time"] = None if secs is None else f"{secs:.0f} s"
        rows.append(row)
    return rows


def drop_empty_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the columns that are None in every row (e.g. no checkpoint recorded its training time)."""
    keep = [k for k in (rows[0] if rows else {}) if any(r.get(k) is not None for r in rows)]
    return [{k: r.get(k) for k in keep} for r in rows]


def accuracy_rows(infos: Iterable[ModelInfo]) -> list[dict[str, Any]]:
    """Rows for ``vitviz.plots.training.accuracy_bars`` (models with both numbers only)."""
    out = []
    for info in infos:
        acc, f1 = metric(info, "accuracy"), metric(info, "macro_f1")
        if acc is not None and f1 is not None:
            out.append({"name": short_name(info), "family": info.family, "test_accuracy": acc,
                        "test_macro_f1": f1})
    return out


def curves_of(info: ModelInfo) -> list[dict[str, Any]]:
    """Per-epoch log rows stored with a checkpoint (``CheckpointMeta.curves``)."""
    return [dict(r) for r in info.curves]


def curve_metrics(curves: Iterable[Sequence[Mapping[str, Any]]]) -> list[str]:
    """Numeric metrics present in some log rows, validation accuracy first."""
    seen: dict[str, None] = {}
    for rows in curves:
        for r in rows:
            for k, v in r.items():
                if k not in ("epoch", "elapsed_s", "cpu_s", "step", "global_step") and isinstance(v, (int, float)) \
                        and not isinstance(v, bool):
                    seen.setdefault(k, None)
    order = ["val_accuracy", "val_macro_f1", "val_loss", "train_loss", "train_accuracy"]
    return sorted(seen, key=lambda k: (order.index(k) if k in order else len(order), k))


def confusion_of(info: ModelInfo) -> list[list[int]] | None:
    """The test confusion matrix stored with a checkpoint (``CheckpointMeta.confusion_matrix``), if any."""
    return None if info.confusion_matrix is None else [list(r) for r in info.confusion_matrix]


def read_results(folder: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """Summaries written by ``vitviz compare`` (``results.json`` with ``rows``) under ``folder``, newest first.

    Looks at ``folder/*.json`` and ``folder/*/results.json``; ``kind`` (e.g. "data-efficiency") filters.
    Unreadable files are skipped: results are a nicety, never a reason for an error.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        return []
    found = []
    for path in [*root.glob("*.json"), *root.glob("*/results.json")]:
        try:
            data = json.loads(path.read_text())
            mtime = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            continue
        if kind is not None and data.get("kind") != kind:
            continue
        found.append((mtime, {**data, "path": str(path)}))
    return [d for _, d in sorted(found, key=lambda t: -t[0])]


def summarise_faithfulness(fractions: np.ndarray, deletion: np.ndarray, insertion: np.ndarray,
                           deletion_auc: np.ndarray, insertion_auc: np.ndarray, hits: np.ndarray | None = None,
                           ious: np.ndarray | None = None) -> dict[str, Any]:
    """Batch results of deletion/insertion (and localisation) reduced to means over the images."""
    out: dict[str, Any] = {
        "fractions": np.asarray(fractions, dtype=np.float64),
        "deletion": np.asarray(deletion, dtype=np.float64).reshape(-1, len(fractions)).mean(axis=0),
        "insertion": np.asarray(insertion, dtype=np.float64).reshape(-1, len(fractions)).mean(axis=0),
        "deletion_auc": float(np.mean(deletion_auc)),
        "insertion_auc": float(np.mean(insertion_auc)),
        "images": int(np.asarray(deletion_auc).size),
    }
    if hits is not None:
        out["pointing_game"] = float(np.mean(np.asarray(hits, dtype=np.float64)))
    if ious is not None:
        out["mask_iou"] = float(np.mean(ious))
    return out


def faithfulness_row(model: str, family: str, method: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the faithfulness table."""
    row = {"Model": model, "Family": family, "Method": method,
           "Deletion AUC ↓": round(result["deletion_auc"], 4), "Insertion AUC ↑": round(result["insertion_auc"], 4)}
    if "pointing_game" in result:
        row["Pointing game ↑"] = round(100 * result["pointing_game"], 1)
        row["Mask IoU ↑"] = round(result["mask_iou"], 3)
    return row


# --------------------------------------------------------------------------------------------------
# predictions


def attention_depth(model: Any) -> int | None:
    """How many attention layers a model's adapter records (None for models without recordable attention)."""
    from vitviz.errors import VitvizError
    from vitviz.explain import adapter_for, has_attention

    try:
        return adapter_for(model).depth() if has_attention(model) else None
    except VitvizError:
        return None


def transformer_dims(model: Any) -> tuple[int, int] | None:
    """(layers, heads) of a transformer whose layers all have the same heads; None otherwise (CNNs,
    models whose attention cannot be recorded, hierarchical models whose heads change by stage)."""
    from vitviz.errors import VitvizError
    from vitviz.explain import adapter_for, has_attention

    try:
        adapter = adapter_for(model)
    except VitvizError:
        return None
    if not has_attention(model):
        return None
    depth, heads = adapter.depth(), adapter.heads()
    return (int(depth), int(heads)) if depth and heads else None


# --------------------------------------------------------------------------------------------------
# patches: where a click on the image lands


def patch_centres(grid: tuple[int, int], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel centres (x, y) of every patch of a ``grid`` over a ``size``-pixel square, and their (row, col).

    Points are listed row-major, so point ``i`` is patch ``(i // cols, i % cols)``.
    """
    rows, cols = int(grid[0]), int(grid[1])
    ph, pw = size / rows, size / cols
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return (c.ravel() + 0.5) * pw - 0.5, (r.ravel() + 0.5) * ph - 0.5, r.ravel(), c.ravel()


def point_to_patch(x: float, y: float, grid: tuple[int, int], size: int) -> tuple[int, int]:
    """The (row, col) of the patch containing pixel (x, y) (clamped into the grid)."""
    rows, cols = int(grid[0]), int(grid[1])
    r = int(np.clip(math.floor((y + 0.5) * rows / size), 0, rows - 1))
    c = int(np.clip(math.floor((x + 0.5) * cols / size), 0, cols - 1))
    return r, c


def clicked_patch(points: Sequence[Mapping[str, Any]], grid: tuple[int, int]) -> tuple[int, int] | None:
    """The (row, col) a plotly click selected, from the ``customdata`` of the first patch marker in ``points``.

    Streamlit hands an array's items over as ``{"0": row, "1": col}``; lists work too. Anything
    outside the grid, or a point of another trace (no customdata), is ignored.
    """
    for p in points or []:
        data = p.get("customdata") if isinstance(p, Mapping) else None
        if isinstance(data, Mapping):
            data = [data.get("0"), data.get("1")]
        if isinstance(data, (list, tuple)) and len(data) >= 2 and None not in data[:2]:
            try:
                r, c = int(data[0]), int(data[1])
            except (TypeError, ValueError):
                continue
            if 0 <= r < grid[0] and 0 <= c < grid[1]:
                return r, c
    return None


# --------------------------------------------------------------------------------------------------
# maps and downloads


def colour_maps() -> list[str]:
    """Colour maps shared by the figures and the PNG renderer (so a download looks like the screen)."""
    from vitviz.explain.render import COLORMAPS

    return list(COLORMAPS)


def peak(saliency: np.ndarray) -> tuple[int, int]:
    """(row, col) of a map's maximum: the first in raster order, as the pointing game takes it."""
    a = np.asarray(saliency)
    r, c = np.unravel_index(int(np.argmax(a)), a.shape)
    return int(r), int(c)


def thumbnail(image: np.ndarray, max_side: int = 320) -> np.ndarray:
    """A copy of ``image`` no larger than ``max_side`` pixels per side, for display (never upscaled)."""
    img = Image.fromarray(np.asarray(image))
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(img)


def display_scale(size: int, target: int = 448) -> int:
    """Integer factor that brings a ``size``-pixel square to about ``target`` pixels (at least 1)."""
    return max(1, int(round(target / max(1, size))))


def overlay_png_bytes(image: np.ndarray, saliency: np.ndarray, opacity: float, colormap: str,
                      mask: np.ndarray | None = None, point: tuple[int, int] | None = None) -> bytes:
    """The overlay as PNG bytes, enlarged (nearest) so small model inputs stay crisp."""
    from vitviz.explain.render import overlay_png

    return overlay_png(image, saliency, opacity=opacity, colormap=colormap, mask=mask, point=point,
                       scale=display_scale(int(np.asarray(image).shape[0])))


def download_stem(image_name: str, method: str) -> str:
    """A file-name stem like ``vitviz_star_chefer`` from an image name and a method."""
    base = Path(str(image_name)).stem.split(" · ")[-1]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{base}_{method}")
    return f"vitviz_{safe.strip('_')[:80] or 'map'}"


def map_to_csv(saliency: np.ndarray) -> bytes:
    """A 2-D map as CSV text (one image row per line, 6 significant digits)."""
    buf = io.StringIO()
    np.savetxt(buf, np.asarray(saliency, dtype=np.float64), delimiter=",", fmt="%.6g")
    return buf.getvalue().encode()


def map_to_npy(saliency: np.ndarray) -> bytes:
    """A map as ``.npy`` bytes (``np.load`` reads it back; no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(saliency, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def bytes_digest(data: bytes) -> str:
    """A short content hash: the cache key of an uploaded image."""
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def params_key(params: Mapping[str, Any]) -> str:
    """A stable, hashable text of explanation parameters (for cache keys and file names)."""
    return json.dumps({k: params[k] for k in sorted(params)}, default=str, separators=(",", ":"))
