"""Cached loaders shared by the pages.

Models live in ``st.cache_resource`` (one copy per process, keyed by file path + mtime + size and
device); decoded images too (large arrays are not copied on every rerun). Predictions and maps live
in ``st.cache_data``, keyed by hashable keys only: the model's key, the image's content hash, the
method and its parameters. Unhashable arguments (the model, the input) are passed with a leading
underscore, so Streamlit does not try to hash them. Widgets that change only the display (opacity,
colour map) never reach these functions with new keys, so they recompute nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from dashboard import support as ds
from vitviz.arrays import to_numpy

ROOT = Path(__file__).resolve().parents[1]
PICTURE_KEY = "vitviz.picture"  # session_state: the image last shown on Explore (Compare reuses it)


def shipped_dir() -> Path:
    """The folder of shipped checkpoints (``$VITVIZ_CHECKPOINTS`` overrides, e.g. in tests)."""
    return Path(os.environ.get("VITVIZ_CHECKPOINTS", ROOT / "checkpoints")).expanduser()


def results_dir() -> Path:
    """The folder of ``vitviz compare`` results (``$VITVIZ_RESULTS`` overrides)."""
    return Path(os.environ.get("VITVIZ_RESULTS", ROOT / "results")).expanduser()


# --------------------------------------------------------------------------------------------------
# devices and models


def cpu_threads() -> int:
    """Intra-op CPU threads for the dashboard: ``$VITVIZ_THREADS``, else 1 on machines with up to 2 cores.

    The dashboard explains one image at a time with small models: thousands of tiny ops. On a busy
    or small machine, every multi-threaded op waits for its slowest thread to be scheduled, and a
    10 ms explanation takes a second (measured here: 2 shared cores, 1 thread 10 ms, 2 threads
    0.5-1.3 s). Larger machines get up to 4 threads for timm-sized models.
    """
    env = os.environ.get("VITVIZ_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores // 2)


@st.cache_resource(show_spinner=False)
def devices() -> list[str]:
    """CUDA devices first (the default when there is a GPU), then the CPU; sets the CPU thread count once."""
    import torch

    torch.set_num_threads(cpu_threads())
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return [*cuda, "cpu"]


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        try:
            return f"{device} — {torch.cuda.get_device_name(int(device.split(':')[1]))}"
        except Exception:
            return device
    return "cpu"


@st.cache_data(show_spinner=False, max_entries=16)
def scan_folder(folder: str, fingerprint: tuple) -> list[ds.CheckpointEntry]:
    """Checkpoints of a folder; ``fingerprint`` (names, mtimes, sizes) makes a changed folder a new key."""
    del fingerprint  # only part of the cache key
    return ds.scan_checkpoints(folder)


def list_checkpoints(folder: str | Path) -> list[ds.CheckpointEntry]:
    folder = str(Path(folder).expanduser())
    return scan_folder(folder, ds.folder_fingerprint(folder))


@dataclass(frozen=True)
class Loaded:
    """A model ready to use: the module (in eval mode, on ``device``) and what we know about it."""

    model: Any
    info: ds.ModelInfo
    device: str

    @property
    def key(self) -> str:
        return f"{self.info.key}@{self.device}"


@st.cache_resource(show_spinner="Loading the model…", max_entries=8)
def load_checkpoint(path: str, key: str, device: str) -> Loaded:
    """Load a checkpoint (``key`` carries its mtime and size, so an overwritten file reloads)."""
    from vitviz.checkpoint import load_checkpoint as _load

    model, meta = _load(path, device)
    info = ds.checkpoint_info(ds.CheckpointEntry(path, Path(path).name, 0, 0, meta, None), meta)
    return Loaded(model, dataclasses.replace(info, key=key), device)


_TIMM_FAILURES: dict[tuple, tuple[float, BaseException]] = {}
TIMM_RETRY_S = 60.0  # a failed timm load (offline, unknown name) is not retried on every rerun


def load_timm(name: str, pretrained: bool, pretrained_file: str | None, device: str) -> Loaded:
    """``timm:<name>`` converted to our model; WeightsUnavailableError says how to supply weights.

    Successes are cached for the process; a failure is remembered for a minute, so that an offline
    machine does not probe the Hub again on every widget change.
    """
    import time

    args = (name, pretrained, pretrained_file, device)
    failed = _TIMM_FAILURES.get(args)
    if failed is not None and time.monotonic() - failed[0] < TIMM_RETRY_S:
        raise failed[1]
    try:
        return _load_timm(*args)
    except Exception as err:
        _TIMM_FAILURES[args] = (time.monotonic(), err)
        raise


@st.cache_resource(show_spinner="Building the timm model (weights download on first use when online)…",
                   max_entries=4)
def _load_timm(name: str, pretrained: bool, pretrained_file: str | None, device: str) -> Loaded:
    from vitviz.explain import adapter_for, has_attention
    from vitviz.models.timm_interop import create_timm_model, timm_preprocessing

    model = create_timm_model(name, pretrained=pretrained and not pretrained_file,
                              pretrained_file=pretrained_file or None,
                              progress=logging.getLogger("vitviz.dashboard").info)
    adapter = adapter_for(model)  # our converted class, or the timm model itself when it does not convert
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    info = ds.timm_info(name, adapter.family, pretrained, timm_preprocessing(name), num_classes, pretrained_file)
    info = dataclasses.replace(info, has_head=adapter.has_head, token_attention=has_attention(model))
    return Loaded(model.to(device).eval(), info, device)


def _remembered(args: tuple, load: Any) -> Loaded:
    """``load(*args)``; a failure is remembered for :data:`TIMM_RETRY_S` so an offline machine is not re-probed."""
    import time

    failed = _TIMM_FAILURES.get(args)
    if failed is not None and time.monotonic() - failed[0] < TIMM_RETRY_S:
        raise failed[1]
    try:
        return load(*args)
    except Exception as err:
        _TIMM_FAILURES[args] = (time.monotonic(), err)
        raise


def _other_info(model: Any, key: str, label: str, source: str) -> ds.ModelInfo:
    """A :class:`ModelInfo` for an ``hf:`` or ``open_clip:`` model, from the model's own preprocessing and classes."""
    from vitviz.explain import adapter_for, has_attention
    from vitviz.models.clip import PromptClassifier

    adapter = adapter_for(model)
    pre = model.preprocessing
    n = int(getattr(model, "num_classes", 0) or 0)
    names = tuple(model.class_names) or tuple(f"class {i}" for i in range(n))
    return ds.ModelInfo(key=key, label=label, source=source, family=adapter.family, img_size=int(pre["img_size"]),
                        mean=tuple(pre["mean"]), std=tuple(pre["std"]), class_names=names,
                        has_head=adapter.has_head, token_attention=has_attention(model),
                        prompts=isinstance(model, PromptClassifier))


def load_hf(source: str, pretrained: bool, device: str) -> Loaded:
    """``hf:<hub id or folder>`` (its own weights, or random ones from its config); failures remembered a minute."""
    return _remembered(("hf", source, pretrained, device), _load_hf)


@st.cache_resource(show_spinner="Loading the Hugging Face model (downloaded on first use when online)…",
                   max_entries=4)
def _load_hf(_kind: str, source: str, pretrained: bool, device: str) -> Loaded:
    import vitviz

    model = vitviz.create_model(f"hf:{source}", pretrained=pretrained,
                                progress=logging.getLogger("vitviz.dashboard").info)
    weights = "" if pretrained else " (random weights)"
    info = _other_info(model, f"hf:{source}:{pretrained}", f"hf:{source}{weights}", "hf")
    return Loaded(model.to(device).eval(), info, device)


def load_clip(arch: str, tag: str | None, weights_file: str | None, device: str) -> Loaded:
    """``open_clip:<arch>`` with a weights tag, a file, or (neither) random weights; prompts come separately."""
    return _remembered(("clip", arch, tag, weights_file, device), _load_clip)


@st.cache_resource(show_spinner="Building the CLIP model (weights download on first use when online)…",
                   max_entries=2)
def _load_clip(_kind: str, arch: str, tag: str | None, weights_file: str | None, device: str) -> Loaded:
    import vitviz

    model = vitviz.create_model(f"open_clip:{arch}", pretrained=tag, pretrained_file=weights_file,
                                progress=logging.getLogger("vitviz.dashboard").info)
    weights = weights_file or tag or "random weights"
    info = _other_info(model, f"open_clip:{arch}:{weights}", f"open_clip:{arch} ({weights})", "clip")
    return Loaded(model.to(device).eval(), info, device)


@st.cache_resource(show_spinner="Encoding the prompts…", max_entries=16)
def with_prompts(base_key: str, prompts: tuple[str, ...], _base: Loaded) -> Loaded:
    """The CLIP of ``_base`` classifying ``prompts``: shares its weights, so only the texts are encoded.

    The key carries the prompts, so predictions and maps cached for other prompts are never reused.
    """
    from vitviz.models.clip import PromptClassifier
    from vitviz.models.hf import with_prompts as hf_with_prompts

    model = _base.model
    clip = model.with_prompts(prompts) if isinstance(model, PromptClassifier) else hf_with_prompts(model, prompts)
    info = _other_info(clip, f"{base_key}|{'|'.join(prompts)}", _base.info.label, _base.info.source)
    return Loaded(clip.to(_base.device).eval(), info, _base.device)


@st.cache_data(show_spinner=False, max_entries=64)
def feature_pca(model_key: str, image_key: str, _subject: Subject) -> np.ndarray:
    """The first three principal components of the last layer's cell features as RGB (h, w, 3) in [0, 1]."""
    from vitviz.explain import feature_pca as _pca

    rgb, _ = _pca(_subject.model, _subject.x)
    return _numpy(rgb)[0]


# --------------------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class Picture:
    """An image to explain: RGB pixels, where it came from, and (for shapes scenes) its object mask."""

    key: str  # "sample:<name>" or "upload:<content hash>"
    name: str
    image: np.ndarray  # (H, W, 3) uint8, read-only
    mask: np.ndarray | None = None  # (H, W) bool
    label: str | None = None
    kind: str = "upload"

    @cached_property
    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image)


@st.cache_resource(show_spinner=False, max_entries=32)
def sample(name: str) -> Picture:
    s = ds.load_sample(name)
    return Picture(f"sample:{name}", name, _frozen(s.image), None if s.mask is None else _frozen(s.mask), s.label,
                   s.kind)


@st.cache_resource(show_spinner=False, max_entries=8)
def _decode(digest: str, _data: bytes, name: str) -> Picture:
    from vitviz.images import open_image

    img = open_image(_data)  # InvalidImageError for anything that is not a good image (not cached)
    picture = Picture(f"upload:{digest}", name, _frozen(np.asarray(img)))
    picture.__dict__["pil"] = img  # the decoded image itself: resizing for a model starts from it, not a copy
    return picture


def decode_upload(data: bytes, name: str) -> Picture:
    """Decode uploaded bytes through :func:`vitviz.images.open_image` (cached by content hash)."""
    if not data:
        from vitviz.errors import InvalidImageError

        raise InvalidImageError(f"{name!r} is empty (0 bytes): upload a PNG, JPEG, WebP, BMP, GIF or TIFF.")
    return _decode(ds.bytes_digest(data), data, name)


@st.cache_resource(show_spinner=False, max_entries=64)
def fitted(image_key: str, size: int, _picture: Picture) -> np.ndarray:
    """``fit_image`` of a picture at a model's input size, once per (image, size): large uploads resize once."""
    from vitviz.images import fit_image

    return _frozen(np.asarray(fit_image(_picture.pil, size)))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


# --------------------------------------------------------------------------------------------------
# model inputs, predictions and maps


class Subject:
    """One model and one image: the input tensor is built only when a cached value is missing."""

    def __init__(self, loaded: Loaded, picture: Picture) -> None:
        self.loaded, self.picture = loaded, picture
        self.model, self.info = loaded.model, loaded.info

    @property
    def key(self) -> tuple[str, str]:
        return self.loaded.key, self.picture.key

    @cached_property
    def fitted_array(self) -> np.ndarray:
        """The square the model sees, (S, S, 3) uint8: what overlays are drawn on."""
        return fitted(self.picture.key, self.info.img_size, self.picture)

    @cached_property
    def fitted(self):
        from PIL import Image

        return Image.fromarray(self.fitted_array)

    @cached_property
    def mask(self) -> np.ndarray | None:
        if self.picture.mask is None:
            return None
        return ds.fit_mask(self.picture.mask, self.info.img_size)

    @cached_property
    def x(self):
        from vitviz.images import preprocess

        return preprocess(self.fitted_array, self.info).to(self.loaded.device)  # (1, 3, S, S), no trip through PIL


@st.cache_data(show_spinner=False, max_entries=256)
def probabilities(model_key: str, image_key: str, _subject: Subject) -> np.ndarray:
    return ds.predict_proba(_subject.model, _subject.x)[0]


@st.cache_data(show_spinner=False, max_entries=256)
def ood(model_key: str, image_key: str, _subject: Subject) -> tuple[float, float] | None:
    """(score, threshold) of ``vitviz.ood_score`` for this image, or None when the model has no calibration."""
    from vitviz.ood import ood_score

    if _subject.info.ood is None:
        return None
    result = ood_score(_subject.model, _subject.info.ood, _subject.x)
    return result.score, result.threshold


@st.cache_data(show_spinner=False, max_entries=512)
def explanation(model_key: str, image_key: str, method: str, params: str, _subject: Subject,
                _kwargs: dict) -> np.ndarray:
    """One saliency map (H, W) in [0, 1]; ``params`` is the JSON of ``_kwargs`` (the cache key)."""
    from vitviz.explain import explain

    out = explain(_subject.model, _subject.x, method, **_kwargs)
    return _numpy(out)[0].astype(np.float32)


def _numpy(t: Any) -> np.ndarray:
    return to_numpy(t)


@st.cache_data(show_spinner=False, max_entries=256)
def attention_heads(model_key: str, image_key: str, layer: int, _subject: Subject) -> np.ndarray:
    """Every head's class-token attention of one layer, (heads, gh, gw), raw weights."""
    from vitviz.explain import attention_heads as _heads

    return _numpy(_heads(_subject.model, _subject.x, layer))[0]


@st.cache_data(show_spinner=False, max_entries=256)
def localisation(model_key: str, image_key: str, method: str, params: str, _saliency: np.ndarray,
                 _mask: np.ndarray) -> tuple[bool, float]:
    """Pointing game (is the maximum inside the mask?) and mask IoU of one map."""
    from vitviz.explain import mask_iou, pointing_game

    return bool(pointing_game(_saliency, _mask)[0]), float(mask_iou(_saliency, _mask)[0])


# --------------------------------------------------------------------------------------------------
# what a ViT learned (Embeddings page): depends on the model only, or on the model and a bundled set


@st.cache_data(show_spinner="Reading the patch filters…", max_entries=16)
def patch_filters(model_key: str, _loaded: Loaded) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Filters (D, p, p, C), their top principal components (K, p, p, C) and explained variance ratios (K,)."""
    from vitviz.explain import patch_embedding_filters, patch_embedding_pca

    pca = patch_embedding_pca(_loaded.model)
    return (_numpy(patch_embedding_filters(_loaded.model)), _numpy(pca.components),
            _numpy(pca.explained_variance_ratio))


@st.cache_data(show_spinner=False, max_entries=16)
def position_similarity(model_key: str, _loaded: Loaded) -> np.ndarray:
    """Cosine similarity of the position embeddings, (gh, gw, gh, gw)."""
    from vitviz.explain import position_similarity as _sim

    return _numpy(_sim(_loaded.model))


@st.cache_data(show_spinner="Measuring attention distances…", max_entries=16)
def attention_distance(model_key: str, n_images: int, _loaded: Loaded) -> np.ndarray:
    """Mean attention distance in pixels, (depth, heads), over ``n_images`` bundled images."""
    from vitviz.explain import attention_distance as _dist
    from vitviz.images import preprocess

    images = ds.dataset_images(_loaded.info.dataset, n_images)
    x = preprocess(images, _loaded.info).to(_loaded.device)
    return _numpy(_dist(_loaded.model, x, batch_size=16))


# --------------------------------------------------------------------------------------------------
# comparison (Compare page)


def results(kind: str | None = None) -> list[dict]:
    """``vitviz compare`` summaries in the results folder (re-read at most once a minute)."""
    return _results(str(results_dir()), kind)


@st.cache_data(show_spinner=False, ttl=60)
def _results(folder: str, kind: str | None) -> list[dict]:
    # keyed by the folder too: another $VITVIZ_RESULTS must not be served this one's summaries
    return ds.read_results(folder, kind)


def methods(loaded: Loaded, saliency_only: bool = False) -> list[str]:
    from vitviz.explain import methods_for

    return methods_for(loaded.model, saliency_only=saliency_only)


@st.cache_data(show_spinner=False, max_entries=512)
def faithfulness(model_key: str, image_keys: tuple[str, ...], method: str, _loaded: Loaded,
                 _pictures: list[Picture], steps: int = 16) -> dict:
    """Deletion/insertion curves and AUCs (mean over the images), pointing game and mask IoU when masks exist."""
    from vitviz.explain import deletion_insertion, explain, mask_iou, pointing_game
    from vitviz.images import preprocess

    info = _loaded.info
    x = preprocess([p.pil for p in _pictures], info).to(_loaded.device)  # (B, 3, S, S)
    maps = explain(_loaded.model, x, method)  # (B, S, S)
    res = deletion_insertion(_loaded.model, x, maps, steps=steps)
    masks = [p.mask for p in _pictures]
    hits = ious = None
    if all(m is not None for m in masks):
        fitted = np.stack([ds.fit_mask(m, info.img_size) for m in masks])
        hits, ious = _numpy(pointing_game(maps, fitted)), _numpy(mask_iou(maps, fitted))
    return ds.summarise_faithfulness(_numpy(res.fractions), _numpy(res.deletion), _numpy(res.insertion),
                                     _numpy(res.deletion_auc), _numpy(res.insertion_auc), hits, ious)
