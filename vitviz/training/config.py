"""The training configuration: one frozen dataclass, every CLI flag a field.

``asdict(TrainConfig)`` is what a checkpoint stores as ``train_config`` and what ``--resume``
compares against, so a run can always be traced back to (and re-run from) its exact settings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from vitviz.errors import ConfigError, TrainingError
from vitviz.models.layers import ATTENTION_PATHS
from vitviz.training.init import INITS

SCHEDULES = ("cosine", "onecycle", "constant")
AMP_MODES = ("auto", "bf16", "off")
SWITCHES = ("auto", "on", "off")
SELECTIONS = ("val_accuracy", "val_loss", "last")

# Settings that may differ between a run and its --resume: they change where and how visibly the
# run executes, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {"out", "resume", "overwrite", "device", "progress", "stop_after", "eval_batch_size", "data_root", "download",
     "threads"}
)

# Model settings a TrainConfig can override by name (None = keep the preset's value).
MODEL_OVERRIDE_FIELDS = (
    "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "pooling", "width", "layers",
    "dropout", "drop_path", "attn_dropout",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (the CLI's flags, one field each)."""

    model: str  # preset name (vitviz.list_models())
    dataset: str  # dataset name (vitviz.data.list_datasets())
    epochs: int  # total epochs of the schedule
    out: str  # run directory: best/last checkpoints, training state, log.jsonl
    img_size: int | None = None  # input side; None = the model preset's
    seed: int = 0  # seeds model init, data order, augmentation, dropout and the train_fraction subset
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:N"
    # --- optimisation ---
    batch_size: int = 128  # global batch: with N processes each takes batch_size / N
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.05  # AdamW decay; never on norms, biases, pos_embed, cls_token
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "cosine"  # "cosine" (linear warmup, cosine decay), "onecycle", "constant"
    warmup_epochs: float = 1.0  # linear warmup (cosine) or rising phase (onecycle), in epochs
    label_smoothing: float = 0.1
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping
    distill: str | None = None  # teacher checkpoint: add a soft-target distillation loss (DeiT-style)
    distill_alpha: float = 0.5  # weight of the distillation term (1 - alpha on the label loss)
    distill_temperature: float = 2.0  # softmax temperature of the distillation term
    ema: float = 0.0  # decay of a moving average of the weights (0 = off); the average is validated and saved
    select: str = "val_accuracy"  # what makes best.safetensors: "val_accuracy" (ties: lower val loss), "val_loss",
    # or "last" (the final epoch: for fixed schedules on a validation split too small to choose by)
    # --- model overrides (None = the preset's value) ---
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    pooling: str | None = None  # "token" | "mean"
    width: int | None = None  # ResNet width (hybrid: backbone_width)
    layers: tuple[int, ...] | None = None  # ResNet blocks per stage (hybrid: backbone_layers)
    dropout: float | None = None
    drop_path: float | None = None
    attn_dropout: float | None = None
    model_args: dict[str, Any] = field(default_factory=dict)  # any other config field of the model
    init: str = "default"  # "default" (the model's own), "mimetic" or "conv" (training/init.py; ViTs, hybrids)
    # --- augmentation (batched, on the training device) ---
    crop_padding: int = 0
    flip: bool = False
    affine: bool = False
    max_rotate: float = 10.0
    max_scale: float = 0.1
    max_translate: float = 0.1
    randaugment: bool = False
    mixup: float = 0.0  # MixUp alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    random_erase: float = 0.0  # probability of erasing one rectangle per image, after normalisation (0 = off)
    # --- data ---
    data_root: str | None = None
    download: bool = False
    train_fraction: float = 1.0  # stratified fraction of the training split (data-efficiency studies)
    limit_train: int | None = None  # keep only this many training images (smoke tests)
    limit_eval: int | None = None  # keep only this many validation and test images (smoke tests)
    eval_batch_size: int = 512
    # --- speed ---
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, off on CPU (measured slower there); "bf16"; "off"
    attention: str = "auto"  # ViT/hybrid training kernel: "auto" (explicit on CPU), "fused", "explicit"
    compile: bool = False  # torch.compile the model for training
    channels_last: str = "auto"  # "auto": on for CNN families (resnet, hybrid); "on"; "off"
    threads: int | None = None  # CPU threads for torch (None: torch's default, one per core)
    # --- run control ---
    resume: bool = False  # continue DIR's run exactly from its last completed epoch
    overwrite: bool = False  # start afresh in a DIR that already holds a run
    stop_after: int | None = None  # stop after this many completed epochs, as if interrupted
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        object.__setattr__(self, "model_args", dict(self.model_args))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible setting."""
        _require(isinstance(self.model, str) and self.model, "model", self.model, "a preset name")
        _require(isinstance(self.dataset, str) and self.dataset, "dataset", self.dataset, "a dataset name")
        _require(isinstance(self.out, str) and self.out, "out", self.out, "a directory")
        _int(self, "epochs", 1)
        _int(self, "batch_size", 1)
        _int(self, "eval_batch_size", 1)
        _int(self, "seed", 0)
        for name in ("img_size", "limit_train", "limit_eval", "stop_after", "patch_size", "embed_dim", "depth",
                     "num_heads", "width", "threads"):
            if getattr(self, name) is not None:
                _int(self, name, 1)
        _int(self, "crop_padding", 0)
        _float(self, "lr", low=0.0, low_open=True)
        for name in ("min_lr", "weight_decay", "warmup_epochs", "clip_grad", "mixup", "cutmix"):
            _float(self, name, low=0.0)
        for name in ("beta1", "beta2", "label_smoothing"):
            _float(self, name, low=0.0, high=1.0)
        _float(self, "distill_alpha", low=0.0, high=1.0, high_open=False)
        _float(self, "distill_temperature", low=0.0, low_open=True)
        _float(self, "ema", low=0.0, high=1.0)
        _float(self, "random_erase", low=0.0, high=1.0, high_open=False)
        _float(self, "train_fraction", low=0.0, high=1.0, low_open=True, high_open=False)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) is longer than the run ({self.epochs} epochs).")
        _choice(self, "schedule", SCHEDULES)
        _choice(self, "init", INITS)
        _choice(self, "select", SELECTIONS)
        _choice(self, "amp", AMP_MODES)
        _choice(self, "attention", ATTENTION_PATHS)
        _choice(self, "channels_last", SWITCHES)

    def model_overrides(self) -> dict[str, Any]:
        """Config fields to change on the model preset (named flags first, then ``model_args``)."""
        out: dict[str, Any] = {}
        for name in MODEL_OVERRIDE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.img_size is not None:
            out["img_size"] = self.img_size
        overlap = set(out) & set(self.model_args)
        if overlap:
            raise ConfigError(f"model setting(s) {sorted(overlap)} given twice (as a flag and in model_args).")
        return {**out, **self.model_args}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        data = dataclasses.asdict(self)
        if data["layers"] is not None:
            data["layers"] = list(data["layers"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}; known: {sorted(known)}.")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"incomplete training settings: {err}") from err

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild the config a run or checkpoint stored, as that run executed it.

        Settings added since then take the value that reproduces the old behaviour: ``attention``
        is ``"fused"`` (training always used the fused kernel before the setting existed), so a
        resumed or re-run old run computes what it computed then.
        """
        return cls.from_dict({"attention": "fused", **data})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def check_resume_compatible(saved: TrainConfig, requested: TrainConfig) -> None:
    """Raise :class:`TrainingError` if ``requested`` changes a setting a resumed run cannot change."""
    a, b = saved.to_dict(), requested.to_dict()
    changed = sorted(k for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k])
    if changed:
        diffs = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in changed)
        raise TrainingError(
            f"cannot resume the run in {requested.out}: these settings differ from the saved run ({diffs}). "
            "Resume with the original settings (flags you leave out are taken from the saved run), or start a "
            "new run in another directory (or pass --overwrite to replace this one)."
        )


# --- validation helpers -----------------------------------------------------------------------------


def _require(ok: Any, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {value!r}.")


def _int(cfg: TrainConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")


def _float(cfg: TrainConfig, name: str, *, low: float, high: float | None = None, low_open: bool = False,
           high_open: bool = True) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f" and {'<' if high_open else '<='} {high}"
        raise ConfigError(f"{name} must be a finite number {lo}{hi}, got {value!r}.")


def _choice(cfg: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
