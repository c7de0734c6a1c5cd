"""Checkpoints: safetensors tensors plus one JSON metadata block; atomic writes; never a pickle.

A checkpoint is a ``.safetensors`` file whose header ``__metadata__`` holds our JSON under the key
``"vitviz"``: the model family and ``config_to_dict(model.config)``, so :func:`load_checkpoint`
rebuilds the model with no code (as nanoGPT's checkpoints carry ``model_args``), plus what the
dashboard and CLI need to use it (class names, preprocessing, metrics, training config).

Every file is validated before a tensor is read, and every problem is a
:class:`~vitviz.errors.CheckpointError` naming the file and what is wrong with it. ``torch.load``
is never called: unpickling a file someone hands us can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from vitviz.atomic import atomic_path
from vitviz.config import FAMILIES, config_from_dict, config_to_dict
from vitviz.errors import CheckpointError, ConfigError, VitvizError
from vitviz.images import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "CheckpointMeta",
    "load_checkpoint",
    "read_checkpoint_meta",
    "read_safetensors",
    "save_checkpoint",
    "update_checkpoint_meta",
    "write_safetensors_atomic",
]

FORMAT_VERSION = 1  # bump when the metadata layout changes incompatibly
METADATA_KEY = "vitviz"  # the __metadata__ key that holds our JSON
_MODEL_KIND = "model"  # "kind" of a model checkpoint; sidecars (training state) use their own
_REDO = "Re-save or re-download it, or pick another file."
_MAX_HEADER = 100_000_000  # safetensors' own cap on the JSON header; larger means garbage
# Bytes per element of the safetensors dtypes, to check a header's sizes without reading the data.
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
_REQUIRED = ("family", "model_config", "img_size", "mean", "std", "format_version")


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything a checkpoint says about itself, read from its header without loading tensors."""

    family: str  # "vit" | "hybrid" | "resnet"
    model_config: dict[str, Any]  # config_to_dict(model.config); config_from_dict(family, ...) rebuilds it
    dataset: str | None  # name of the dataset it was trained on, if any
    class_names: list[str] | None  # one per output logit, in order
    img_size: int  # side of the square input the model expects
    mean: tuple[float, float, float]  # per-channel normalisation used in training
    std: tuple[float, float, float]
    train_config: dict[str, Any] | None  # the training settings that produced it
    metrics: dict[str, Any] | None  # e.g. test_accuracy, macro_precision, macro_recall, macro_f1
    vitviz_version: str  # the vitviz that wrote it
    format_version: int  # layout of this metadata (FORMAT_VERSION when written)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else: created_at, per-class scores, ...
    ood: dict[str, Any] | None = None  # out-of-distribution calibration (vitviz.ood); None in older files
    curves: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch, as vitviz train logs it
    confusion_matrix: list[list[int]] | None = None  # test split: rows true class, columns predicted
    num_params: int | None = None  # trainable and frozen parameters
    train_time_s: float | None = None  # wall-clock training time

    @property
    def num_classes(self) -> int:
        """Number of output logits (0 for a features-only model)."""
        cfg = self.model_config
        if self.family == "hybrid" and isinstance(cfg.get("vit"), Mapping):
            cfg = cfg["vit"]
        n = cfg.get("num_classes")
        if isinstance(n, int) and not isinstance(n, bool):
            return n
        return len(self.class_names) if self.class_names else 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``CheckpointMeta.from_dict(meta.to_dict()) == meta``."""
        return {
            "format_version": self.format_version,
            "vitviz_version": self.vitviz_version,
            "family": self.family,
            "model_config": _deepcopy_json(self.model_config),
            "dataset": self.dataset,
            "class_names": None if self.class_names is None else list(self.class_names),
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "train_config": _deepcopy_json(self.train_config),
            "metrics": _deepcopy_json(self.metrics),
            "extra": _deepcopy_json(self.extra),
            "ood": _deepcopy_json(self.ood),
            "curves": _deepcopy_json(self.curves),
            "confusion_matrix": _deepcopy_json(self.confusion_matrix),
            "num_params": self.num_params,
            "train_time_s": self.train_time_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointMeta:
        """Validate and build from a dict as written by :meth:`to_dict` (CheckpointError if bad)."""
        return _meta_from_dict(data, "checkpoint metadata")


# --------------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    family: str | None = None,
    dataset: str | None = None,
    class_names: Sequence[str] | None = None,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    train_config: Mapping[str, Any] | Any | None = None,
    metrics: Mapping[str, Any] | None = None,
    ood: Mapping[str, Any] | None = None,
    curves: Sequence[Mapping[str, Any]] | None = None,
    confusion_matrix: Sequence[Sequence[int]] | None = None,
    num_params: int | None = None,
    train_time_s: float | None = None,
    **extra: Any,
) -> Path:
    """Write ``model``'s weights and metadata to ``path`` atomically; return the path.

    ``family`` defaults to ``model.family``, ``img_size`` to the config's, ``mean``/``std`` to
    ImageNet's. ``train_config`` may be a dict or a dataclass. ``ood`` is an out-of-distribution
    calibration from :func:`vitviz.ood.calibrate` (``meta.ood``). ``curves`` (per-epoch log rows),
    ``confusion_matrix`` (test split), ``num_params`` and ``train_time_s`` are typed fields of
    :class:`CheckpointMeta`; ``num_params`` defaults to the model's count. Keyword arguments beyond these are
    kept in ``meta.extra`` (a ``created_at`` UTC timestamp is added unless given). Everything must
    be JSON-serialisable (numpy scalars/arrays, small tensors and paths are converted).
    A DDP- or ``torch.compile``-wrapped model is unwrapped first, so keys never carry
    ``module.``/``_orig_mod.`` prefixes.
    """
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise CheckpointError(
            f"cannot save {type(model).__name__} to {path}: it has no .config dataclass; only models built "
            "by vitviz (build_model / create_model) can be saved as checkpoints."
        )
    family = family if family is not None else getattr(model, "family", None)
    if family not in FAMILIES:
        raise ConfigError(f"cannot save to {path}: model family {family!r} is not one of {FAMILIES}; pass family=.")
    model_config = config_to_dict(config)
    config_from_dict(family, model_config)  # fail now, not when someone tries to load the file

    if img_size is None:
        img_size = getattr(config, "img_size", None)
        if img_size is None and hasattr(config, "vit"):
            img_size = config.vit.img_size
    img_size = _positive_int(img_size, "img_size", str(path), ConfigError)

    if isinstance(class_names, str):
        raise ConfigError("class_names must be a list of names, not one string.")
    names = None if class_names is None else [str(c) for c in class_names]
    meta = CheckpointMeta(
        family=family,
        model_config=model_config,
        dataset=None if dataset is None else str(dataset),
        class_names=names,
        img_size=img_size,
        mean=_triple(mean, IMAGENET_MEAN, "mean", str(path), ConfigError),
        std=_triple(std, IMAGENET_STD, "std", str(path), ConfigError, positive=True),
        train_config=_as_dict(train_config, "train_config"),
        metrics=_as_dict(metrics, "metrics"),
        vitviz_version=_vitviz_version(),
        format_version=FORMAT_VERSION,
        extra={"created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra},
        ood=_as_dict(ood, "ood"),
        curves=_curves(curves, str(path), ConfigError),
        confusion_matrix=_matrix(confusion_matrix, str(path), ConfigError),
        num_params=_positive_int(num_params if num_params is not None else sum(p.numel() for p in model.parameters()),
                                 "num_params", str(path), ConfigError),
        train_time_s=_seconds(train_time_s, str(path), ConfigError),
    )
    for name, value in (("train_config", meta.train_config), ("metrics", meta.metrics), ("ood", meta.ood),
                        ("curves", meta.curves), *extra.items()):
        _dumps(value, name)  # names the culprit as the caller wrote it, e.g. metrics['per_class'][2]
    n = meta.num_classes
    if names is not None and n and len(names) != n:
        raise ConfigError(
            f"cannot save to {path}: {len(names)} class_names for a model with {n} outputs; "
            "pass one name per output."
        )
    return write_safetensors_atomic(path, model.state_dict(), {"kind": _MODEL_KIND, **meta.to_dict()})


def write_safetensors_atomic(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Write tensors and a JSON metadata dict (under ``"vitviz"``) to ``path``, atomically.

    The file is written to a temporary file in the same directory, flushed to disk and renamed over
    ``path``, so a crash leaves either the old file or the new one, never half of one; the
    temporary file is removed on any failure. Parent directories are created. Tensors are detached,
    moved to CPU and made contiguous; tensors sharing storage (tied weights) are cloned, because
    safetensors refuses aliased storage.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory; give a file name.")
    text = _dumps(dict(metadata), "metadata")
    prepared = _prepare_tensors(tensors, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create the directory for {path}: {err}") from err

    try:
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(prepared, str(tmp), metadata={METADATA_KEY: text, "format": "pt"})
    except Exception as err:
        if isinstance(err, VitvizError):
            raise
        raise CheckpointError(f"could not write checkpoint {path}: {err}") from err
    return path


def update_checkpoint_meta(path: str | os.PathLike, **changes: Any) -> CheckpointMeta:
    """Replace metadata fields of a checkpoint in place (e.g. ``ood=``); return the new metadata.

    Only the header is rewritten: the tensor bytes are copied unchanged, so the weights stay
    bit-identical. The new file is written beside the old one and renamed over it, so a crash
    leaves either the old file or the new one. ``changes`` are :class:`CheckpointMeta` field names.
    """
    path = Path(path)
    names = {f.name for f in dataclasses.fields(CheckpointMeta)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ConfigError(f"cannot update {unknown} of {path}: checkpoint metadata fields are {sorted(names)}.")
    meta = read_checkpoint_meta(path)
    new = CheckpointMeta.from_dict(dataclasses.replace(meta, **changes).to_dict())  # validates the changes
    header = _read_header(path)
    header["__metadata__"] = {**(header.get("__metadata__") or {}),
                              METADATA_KEY: _dumps({"kind": _MODEL_KIND, **new.to_dict()}, "metadata")}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes so the data stays aligned

    try:
        with atomic_path(path, os.stat(path).st_mode & 0o777) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
            (n,) = struct.unpack("<Q", src.read(8))
            src.seek(8 + n)
            dst.write(struct.pack("<Q", len(text)) + text)
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except OSError as err:
        raise CheckpointError(f"could not rewrite the metadata of {path}: {err}") from err
    return read_checkpoint_meta(path)


# --------------------------------------------------------------------------------------------------
# loading


def read_checkpoint_meta(path: str | os.PathLike) -> CheckpointMeta:
    """Read and validate a checkpoint's metadata from its header; no tensor is loaded."""
    path = Path(path)
    metadata = _read_vitviz_metadata(path)
    kind = metadata.get("kind", _MODEL_KIND)
    if kind != _MODEL_KIND:
        raise CheckpointError(
            f"{path} is a vitviz {kind!r} file, not a model checkpoint; pass the model's .safetensors file."
        )
    return _meta_from_dict(metadata, str(path))


def read_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate and read a vitviz safetensors file: (tensors on ``device``, metadata dict)."""
    path = Path(path)
    dev = parse_device(device)
    metadata = _read_vitviz_metadata(path)
    try:
        tensors = safetensors.torch.load_file(str(path), device=str(dev))
    except Exception as err:
        raise CheckpointError(f"{path} is a damaged safetensors file ({err}); re-save or re-download it.") from err
    return tensors, metadata


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, strict: bool = True
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model a checkpoint describes, load its weights, return ``(model.eval(), meta)``.

    ``device``: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available). ``strict=False`` loads
    the tensors that match and ignores missing or unexpected keys; wrong shapes are always an error.
    """
    path = Path(path)
    dev = parse_device(device)
    meta = read_checkpoint_meta(path)
    from vitviz.models import build_model  # imported here: models import much; meta readers need none

    try:
        config = config_from_dict(meta.family, meta.model_config)
        model = build_model(meta.family, config)
    except Exception as err:
        raise CheckpointError(
            f"{path}: its {meta.family} model config cannot be rebuilt ({err}); the file may come from "
            f"another vitviz version (it was written by {meta.vitviz_version})."
        ) from err
    tensors, _ = read_safetensors(path, "cpu")
    _check_state_dict(model, tensors, path, meta.family, strict)
    model.load_state_dict(tensors, strict=strict)
    return model.to(dev).eval(), meta


# --------------------------------------------------------------------------------------------------
# validation


def _read_vitviz_metadata(path: Path) -> dict[str, Any]:
    """Check the file's structure from its header and return our parsed JSON metadata."""
    header = _read_header(path)
    raw = header.get("__metadata__") or {}
    text = raw.get(METADATA_KEY) if isinstance(raw, dict) else None
    if text is None:
        raise CheckpointError(
            f"{path} is a safetensors file without vitviz metadata (e.g. bare weights from timm or the Hub), "
            "not a vitviz checkpoint; load the weights into a vitviz model and save it with "
            "vitviz.save_checkpoint."
        )
    try:
        metadata = json.loads(text)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its vitviz metadata is not valid JSON ({err}); the file is damaged.") from err
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{path}: its vitviz metadata is a JSON {type(metadata).__name__}, not an object; the file is damaged."
        )
    return metadata


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors header of ``path``, checked against the file: CheckpointError saying what is wrong."""
    raw, size = _read_raw_header(path)
    header = _parse_header(raw, path)
    _check_entries(header, path, have=size - 8 - len(raw))
    return header


def _read_raw_header(path: Path) -> tuple[bytes, int]:
    """The header's bytes and the file's size, after the checks a file's first 8 bytes allow."""
    if not path.exists():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; pass the .safetensors file.")
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            head = fp.read(8)
            if size == 0:
                raise CheckpointError(
                    f"{path} is empty (0 bytes); a save was probably interrupted. Re-save or re-train it."
                )
            if _looks_pickled(head):
                raise CheckpointError(
                    f"{path} looks like a pickled PyTorch file (torch.save output); vitviz never unpickles "
                    "checkpoints, because unpickling can run arbitrary code. If you trust it, convert it: "
                    "load it with torch.load(path, weights_only=True), put the weights into a vitviz "
                    "model and re-save with vitviz.save_checkpoint."
                )
            if size < 8:
                raise CheckpointError(f"{path} is incomplete or not a vitviz checkpoint: it holds only {size} bytes. "
                                      f"{_REDO}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path} is not a vitviz checkpoint: it does not begin the way a .safetensors "
                                      f"file does. {_REDO}")
            if 8 + n > size:
                raise CheckpointError(
                    f"{path} is incomplete: it ends inside its own description of the weights (a copy or download "
                    f"was probably cut short). {_REDO}"
                )
            return fp.read(n), size
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


def _parse_header(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        if not raw.startswith(b"{"):
            raise ValueError("the header is not a JSON object")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a vitviz checkpoint, or it is damaged: its description of the weights "
                              f"cannot be read. {_REDO}") from err
    return header


def _check_entries(header: dict[str, Any], path: Path, have: int) -> None:
    """Every tensor entry has a valid place, shape and size, and the ``have`` data bytes are exactly the weights."""
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(f"{path} is damaged: it does not say where the weights {name!r} are. {_REDO}")
        itemsize = _DTYPE_SIZES.get(entry.get("dtype"))
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{path} is damaged: the weights {name!r} have no valid shape. {_REDO}")
        if itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise CheckpointError(f"{path} is damaged: the weights {name!r} take the wrong number of bytes for their "
                                  f"shape. {_REDO}")
        data_end = max(data_end, offsets[1])
    if have < data_end:
        raise CheckpointError(
            f"{path} is incomplete: {data_end - have:,} bytes of its weights are missing (a copy or download was "
            f"probably cut short). {_REDO}"
        )
    if have > data_end:
        raise CheckpointError(f"{path} is damaged: {have - data_end:,} unexpected bytes follow its weights. {_REDO}")


def _looks_pickled(head: bytes) -> bool:
    # torch.save writes a zip archive (PK\x03\x04) since 1.6 and a bare pickle (\x80 + protocol) before.
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _meta_from_dict(data: Mapping[str, Any], where: str) -> CheckpointMeta:
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CheckpointError(
            f"{where}: the vitviz metadata lacks {missing}; it is not a model checkpoint "
            "(a training-state sidecar, or damaged)."
        )
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{where}: format_version {version!r} is not a positive integer.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} was written by a newer vitviz ({data.get('vitviz_version', '?')}, format {version}; "
            f"this one reads format {FORMAT_VERSION}); upgrade vitviz to load it."
        )
    family = data["family"]
    if family not in FAMILIES:
        raise CheckpointError(f"{where}: unknown model family {family!r}; this vitviz knows {list(FAMILIES)}.")
    model_config = data["model_config"]
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{where}: model_config is a {type(model_config).__name__}, not an object.")
    class_names = data.get("class_names")
    if class_names is not None and (
        not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names)
    ):
        raise CheckpointError(f"{where}: class_names must be a list of strings.")
    dataset = data.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise CheckpointError(f"{where}: dataset must be a string, got {dataset!r}.")
    optional = {}
    for key in ("train_config", "metrics", "ood"):
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{where}: {key} must be an object, got {type(value).__name__}.")
        optional[key] = value
    extra = data.get("extra") or {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{where}: extra must be an object, got {type(extra).__name__}.")
    # Keys a later format-1 writer adds are kept rather than lost.
    known = set(_REQUIRED) | {"kind", "vitviz_version", "dataset", "class_names", "train_config", "metrics", "extra",
                              "ood", *_TYPED}
    extra = {**extra, **{k: v for k, v in data.items() if k not in known}}
    # Files written before the typed fields existed keep them in ``extra`` under the names vitviz train used.
    typed = {key: data[key] if data.get(key) is not None else extra.pop(old, None) for key, old in _TYPED.items()}
    return CheckpointMeta(
        family=family,
        model_config=model_config,
        dataset=dataset,
        class_names=class_names,
        img_size=_positive_int(data["img_size"], "img_size", where, CheckpointError),
        mean=_triple(data["mean"], None, "mean", where, CheckpointError),
        std=_triple(data["std"], None, "std", where, CheckpointError, positive=True),
        train_config=optional["train_config"],
        metrics=optional["metrics"],
        vitviz_version=str(data.get("vitviz_version", "0+unknown")),
        format_version=version,
        extra=extra,
        ood=optional["ood"],
        curves=_curves(typed["curves"], where, CheckpointError),
        confusion_matrix=_matrix(typed["confusion_matrix"], where, CheckpointError),
        num_params=None if typed["num_params"] is None else _positive_int(typed["num_params"], "num_params", where,
                                                                           CheckpointError),
        train_time_s=_seconds(typed["train_time_s"], where, CheckpointError),
    )


# typed field -> the key ``extra`` held it under in files written before it was a field
_TYPED = {"curves": "curves", "confusion_matrix": "test_confusion_matrix", "num_params": "num_params",
          "train_time_s": "train_time_s"}


def _curves(value: Any, where: str, error: type[Exception]) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(isinstance(r, Mapping) for r in value):
        raise error(f"{where}: curves must be a list of per-epoch rows (objects), got {type(value).__name__}.")
    return [dict(r) for r in value]


def _matrix(value: Any, where: str, error: type[Exception]) -> list[list[int]] | None:
    if value is None:
        return None
    rows = value.tolist() if hasattr(value, "tolist") else value  # a numpy array or tensor as nested lists
    rows = [list(r) for r in rows] if isinstance(rows, Sequence) and all(isinstance(r, Sequence) for r in rows) else []
    if not rows or any(len(r) != len(rows) for r in rows) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for r in rows for v in r):
        raise error(f"{where}: confusion_matrix must be a square table of counts (non-negative integers).")
    return rows


def _seconds(value: Any, where: str, error: type[Exception]) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise error(f"{where}: train_time_s must be a non-negative number of seconds, got {value!r}.")
    return float(value)


def _check_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, family: str, strict: bool
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in tensors and tensors[k].shape != expected[k].shape
    ]
    problems = []
    if wrong:
        problems.append(f"{_count(wrong)} with the wrong shape (file vs model): {_few(wrong)}")
    if strict and missing:
        problems.append(f"{_count(missing)} missing: {_few(missing)}")
    if strict and unexpected:
        problems.append(f"{_count(unexpected)} unexpected: {_few(unexpected)}")
    if problems:
        hint = "" if wrong else "; strict=False loads the matching tensors only"
        raise CheckpointError(
            f"{path} does not match the {family} model its config builds: " + "; ".join(problems)
            + f". The file was edited or written by different code; re-save it with vitviz.save_checkpoint{hint}."
        )


def _count(items: list[str]) -> str:
    return f"{len(items)} tensor" + ("" if len(items) == 1 else "s")


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


# --------------------------------------------------------------------------------------------------
# helpers


def _prepare_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(f"cannot write {path}: tensor names must be strings, got {name!r}.")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"cannot write {path}: {name!r} is a {type(t).__name__}, not a tensor.")
        if t.is_meta or t.layout != torch.strided:
            raise CheckpointError(f"cannot write {path}: {name!r} is a meta or sparse tensor with no plain data.")
        t = t.detach().cpu()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        compact = t.is_contiguous() and storage.nbytes() == t.numel() * t.element_size()
        if not compact or (ptr and ptr in seen):
            # Views and aliases (tied weights) get storage of their own; safetensors refuses sharing.
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            seen.add(ptr)
        out[name] = t
    return out


def _dumps(obj: Any, what: str) -> str:
    try:
        # NaN is allowed: a metric can honestly be NaN, and losing a trained model over it is worse.
        return json.dumps(obj, default=_json_default, allow_nan=True)
    except (TypeError, ValueError, RecursionError) as err:
        culprit = _find_unjsonable(obj, what) or what
        raise CheckpointError(
            f"cannot store {culprit} in a checkpoint: {err}. Pass numbers, strings, lists and dicts."
        ) from err


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor) and obj.numel() <= 65_536:
        return obj.detach().cpu().tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return config_to_dict(obj)
    raise TypeError(f"values of type {type(obj).__name__} are not JSON-serialisable")


def _find_unjsonable(obj: Any, where: str, depth: int = 0) -> str | None:
    """Name the first value json cannot write, e.g. ``metrics['per_class'][2] (set)``."""
    if depth > 20:
        return f"{where} (nested too deep or circular)"
    try:
        json.dumps(obj, default=_json_default, allow_nan=True)
        return None
    except (TypeError, ValueError, RecursionError):
        pass
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{where} key {k!r}"
            found = _find_unjsonable(v, f"{where}[{k!r}]", depth + 1)
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _find_unjsonable(v, f"{where}[{i}]", depth + 1)
            if found:
                return found
    return f"{where} ({type(obj).__name__})"


def _deepcopy_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_deepcopy_json(v) for v in obj]
    return obj


def _as_dict(value: Any, name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"{name} must be a dict (or a dataclass), got {type(value).__name__}.")


def _positive_int(value: Any, name: str, where: str, error: type[Exception]) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise error(f"{where}: {name} must be a positive integer, got {value!r}.")
    return int(value)


def _triple(
    value: Any, default: tuple[float, float, float] | None, name: str, where: str, error: type[Exception],
    positive: bool = False,
) -> tuple[float, float, float]:
    if value is None and default is not None:
        return default
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) for v in out) or (positive and min(out) <= 0):
        rule = "three positive numbers" if positive else "three numbers"
        raise error(f"{where}: {name} must be {rule} (one per RGB channel), got {value!r}.")
    return out  # type: ignore[return-value]


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def parse_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> CUDA when available, else CPU; a ConfigError for a device this machine lacks."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} was asked for but CUDA is not available on this machine; "
                "use device='cpu' or device='auto'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} was asked for but MPS is not available; use 'cpu' or 'auto'.")
    return dev


def _vitviz_version() -> str:
    try:
        return importlib.metadata.version("vitviz")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        import vitviz

        version = getattr(vitviz, "__version__", None)
    except ImportError:
        version = None
    return version if isinstance(version, str) else "0+unknown"
