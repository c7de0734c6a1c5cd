"""The training loop: one function, :func:`train`, from a :class:`TrainConfig` to checkpoints.

Data lives on the training device as uint8 tensors; every epoch draws a permutation from a seeded
generator, each rank takes its shard, batches are augmented on the device with a second generator,
and the schedule is a function of the global step. After every epoch the run writes, in this order,
``best.safetensors`` (when validation improved), the training-state sidecar, ``last.safetensors`` and
``log.jsonl``. The sidecar alone defines the resume point, so a kill at any moment resumes to a
result bit-identical (on CPU) to a run never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitviz.atomic import write_text_atomic
from vitviz.checkpoint import load_checkpoint, parse_device, read_checkpoint_meta, save_checkpoint
from vitviz.config import HybridConfig
from vitviz.data import Augment, load_dataset, mixup_cutmix, normalize, random_erase
from vitviz.data.splits import DatasetSplits, Split
from vitviz.data.uploads import upload_views
from vitviz.errors import ConfigError, TrainingError, VitvizError
from vitviz.evaluate import autocast, confusion_and_loss, evaluate
from vitviz.metrics import classification_report
from vitviz.models.layers import set_training_attention
from vitviz.models.registry import ModelConfig, build_model, preset_config
from vitviz.ood import calibrate as calibrate_ood
from vitviz.training import distributed
from vitviz.training.config import TrainConfig, check_resume_compatible
from vitviz.training.distill import Teacher, distillation_loss
from vitviz.training.ema import WeightEma
from vitviz.training.init import apply_init
from vitviz.training.optim import lr_at, make_optimizer
from vitviz.training.state import Generators, TrainState, load_state, read_state, save_state

BEST, LAST, STATE, LOG, RESULTS = "best.safetensors", "last.safetensors", "last.state.safetensors", "log.jsonl", \
    "results.json"
CNN_FAMILIES = ("resnet", "hybrid")


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    out: Path  # the run directory
    finished: bool  # False when stopped early by stop_after (resume to finish)
    epochs_done: int
    best_epoch: int | None
    val_accuracy: float | None  # of the best epoch
    test: dict[str, Any] | None  # test report of the best model (finished runs only)
    train_time_s: float  # wall time of the training epochs (validation included), across resumes
    cpu_time_s: float  # CPU time of this process in those epochs
    num_params: int
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_path(self) -> Path:
        return self.out / BEST

    @property
    def last_path(self) -> Path:
        return self.out / LAST


# --------------------------------------------------------------------------------------------------
# setting up


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available; a ConfigError for devices this machine lacks or training can't use."""
    dev = parse_device(name)  # parsed, and checked to exist on this machine
    if dev.type == "cuda" and dev.index is None:  # one process per GPU under torchrun
        dev = torch.device("cuda", local_rank)
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"device {dev} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    elif dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported for training; use auto, cpu, cuda or cuda:N.")
    return dev


def resolve_model(config: TrainConfig, num_classes: int | None = None) -> tuple[str, ModelConfig]:
    """(family, model config) of the preset with the run's overrides; ConfigError if impossible."""
    overrides = config.model_overrides()
    family, _ = preset_config(config.model)
    if family == "hybrid":  # the CNN-side flags name the backbone's fields in a hybrid
        for flag, real in (("width", "backbone_width"), ("layers", "backbone_layers")):
            if flag in overrides:
                overrides[real] = overrides.pop(flag)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    try:
        family, model_cfg = preset_config(config.model, **overrides)
    except TypeError as err:  # a value of the wrong type deep in a dataclass
        raise ConfigError(f"bad model setting for {config.model!r}: {err}") from err
    return family, model_cfg


def _img_size(model_cfg: ModelConfig) -> int:
    return model_cfg.vit.img_size if isinstance(model_cfg, HybridConfig) else model_cfg.img_size


def saved_config(out: str | os.PathLike) -> TrainConfig | None:
    """The configuration of the run saved in ``out`` (from its training state), or None if there is none."""
    path = Path(out) / STATE
    if not path.exists():
        return None
    _, meta = read_state(path)
    return TrainConfig.from_saved(meta["config"])


def _prepare_out(config: TrainConfig, out: Path) -> bool:
    """Check the run directory against resume/overwrite; True when resuming."""
    has_state = (out / STATE).exists()
    if config.resume and has_state:
        saved = saved_config(out)
        assert saved is not None
        check_resume_compatible(saved, config)
        return True
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the run.")
    existing = [p for p in (STATE, LAST, BEST) if (out / p).exists()]
    if config.resume and existing:
        raise TrainingError(
            f"cannot resume the run in {out}: it has {', '.join(existing)} but no training state ({STATE}), so it "
            "cannot continue exactly. Start afresh with --overwrite, or fine-tune from the checkpoint in a new run."
        )
    if existing and not config.overwrite:
        raise TrainingError(
            f"{out} already holds a run ({', '.join(existing)}). Pass --resume to continue it, --overwrite to start "
            "over (its checkpoints are replaced), or choose another --out directory."
        )
    return False


def _seeded_subset(split: Split, limit: int | None, seed: int) -> Split:
    if limit is None or limit >= len(split):
        return split
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(order[:limit].sort().values)


def _load_data(config: TrainConfig, img_size: int) -> DatasetSplits:
    data = load_dataset(config.dataset, img_size=img_size, root=config.data_root, download=config.download,
                        train_fraction=config.train_fraction, seed=config.seed)
    train = _seeded_subset(data.train, config.limit_train, config.seed)
    val = _seeded_subset(data.val, config.limit_eval, 1)
    test = _seeded_subset(data.test, config.limit_eval, 2)
    return DatasetSplits(data.name, train, val, test, data.class_names, data.mean, data.std)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.amp == "off":
        return None
    if config.amp == "bf16":
        return torch.bfloat16
    # auto: bf16 on GPUs that have it; on CPU it measured slower than float32 for these models.
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


# --------------------------------------------------------------------------------------------------
# the run


def train(config: TrainConfig, *, on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; write checkpoints and logs into ``config.out``.

    Launched by ``torchrun``, every process calls this and the run is data-parallel (DDP).
    ``on_epoch_end`` receives each epoch's log row (on rank 0).

    Raises:
        ConfigError: an impossible setting (unknown model, image size the model cannot take, ...).
        DatasetError: unknown dataset or missing files.
        TrainingError: a non-finite loss (the last good checkpoints stay), or a run directory that
            cannot be resumed or would be overwritten.
    """
    config.validate()
    resolve_model(config)  # unknown model or impossible settings fail before anything else
    threads = torch.get_num_threads()
    if config.threads is not None:
        # On a CPU shared with other jobs, fewer threads than cores avoids OpenMP threads waiting on
        # descheduled siblings (measured here: 1 thread ran a small ViT step 90x faster than 2 under load).
        torch.set_num_threads(config.threads)
    env = distributed.setup(resolve_device(config.device).type)
    try:
        return _Run(config, env).run(on_epoch_end)
    finally:
        distributed.teardown(env)
        torch.set_num_threads(threads)


class _Run:
    """One training run's objects; :meth:`run` is the loop."""

    def __init__(self, config: TrainConfig, env: distributed.DistEnv) -> None:
        self.config, self.env = config, env
        self.device = resolve_device(config.device, env.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out = Path(config.out)
        self._check_and_prepare()
        self._build_model()
        self._build_optimisation()
        self._build_data_pipeline()

    def _check_and_prepare(self) -> None:
        """Refuse bad settings and load the data before any file is touched; then clear or keep the output folder."""
        config, env = self.config, self.env
        family, _ = resolve_model(config)
        if config.init != "default" and family not in ("vit", "hybrid"):
            apply_init(nn.Identity(), config.init, family)  # raises ConfigError before any work
        self.resuming = _prepare_out(config, self.out)
        if config.batch_size % env.world_size:
            raise ConfigError(
                f"batch_size {config.batch_size} does not split evenly over {env.world_size} processes; "
                f"use a multiple of {env.world_size}."
            )
        self.local_batch = config.batch_size // env.world_size
        _, model_cfg = resolve_model(config)
        self.data = _load_data(config, _img_size(model_cfg))  # a missing dataset fails before any file is touched
        if not self.resuming and env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in (STATE, LAST, BEST, LOG, RESULTS):  # --overwrite: no file of the old run survives
                (self.out / name).unlink(missing_ok=True)
        env.barrier()

    def _build_model(self) -> None:
        """The model, initialised identically on every rank, on the device in its memory format."""
        config = self.config
        self.family, self.model_cfg = resolve_model(config, self.data.num_classes)
        torch.manual_seed(config.seed)  # model initialisation: the same on every rank
        model = build_model(self.family, self.model_cfg)
        apply_init(model, config.init, self.family)
        set_training_attention(model, config.attention)
        self.model = model.to(self.device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        use_cl = config.channels_last == "on" or (config.channels_last == "auto" and self.family in CNN_FAMILIES)
        self.memory_format = torch.channels_last if use_cl else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)

    def _build_optimisation(self) -> None:
        """Generators, optimiser, weight averaging, resumed state, DDP / compile wrappers, AMP and the teacher."""
        config, env = self.config, self.env
        # Dropout and stochastic depth draw from the global generator: a distinct stream per rank.
        torch.manual_seed(config.seed + 7919 * (env.rank + 1))
        self.gens = Generators.seeded(config.seed, env.rank, self.device)
        self.optimizer = make_optimizer(self.model, lr=config.lr, weight_decay=config.weight_decay,
                                        betas=(config.beta1, config.beta2), device=self.device)
        self.ema = WeightEma(self.model, config.ema) if config.ema > 0 else None
        # What is validated, selected and saved: the averaged weights when there are any.
        self.eval_model: nn.Module = self.ema.module if self.ema is not None else self.model
        self.state = TrainState()
        if self.resuming:
            self.state = load_state(self.out / STATE, model=self.model, optimizer=self.optimizer, gens=self.gens,
                                    env=env, device=self.device,
                                    ema=None if self.ema is None else self.ema.module)
        self.forward_model: nn.Module = self.model
        if env.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.amp_dtype = _amp_dtype(config, self.device)
        self.teacher = None if config.distill is None else Teacher(
            config.distill, device=self.device, class_names=self.data.class_names, mean=self.data.mean,
            std=self.data.std, img_size=_img_size(self.model_cfg))

    def _build_data_pipeline(self) -> None:
        """Augmentation, the training set on the device, and the step schedule."""
        config, env = self.config, self.env
        self.augment = Augment(crop_padding=config.crop_padding, flip=config.flip, affine=config.affine,
                               max_rotate=config.max_rotate, max_scale=config.max_scale,
                               max_translate=config.max_translate, randaugment=config.randaugment)
        self.train_images = self.data.train.images.to(self.device)  # uint8 (N, 3, H, W), stays on the device
        self.train_labels = self.data.train.labels.to(self.device)  # (N,)
        per_rank = -(-len(self.data.train) // env.world_size)
        self.steps_per_epoch = -(-per_rank // self.local_batch)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = round(config.warmup_epochs * self.steps_per_epoch)
        # Non-finite checks synchronise with the device: every step on CPU (free), every 20 on GPUs.
        self.check_every = 1 if self.device.type == "cpu" else 20

    # --- helpers ---------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.env.is_main:
            tqdm.write(text, file=sys.stderr)

    def _ckpt_kwargs(self) -> dict[str, Any]:
        d = self.data
        return {"family": self.family, "dataset": d.name, "class_names": d.class_names,
                "img_size": _img_size(self.model_cfg), "mean": d.mean, "std": d.std,
                "train_config": self.config.to_dict()}

    def _extra(self) -> dict[str, Any]:
        return {"curves": self.state.history, "train_time_s": round(self.state.train_time_s, 3),
                "cpu_time_s": round(self.state.cpu_time_s, 3), "num_params": self.num_params,
                "epochs_done": self.state.epoch}

    def _save(self, name: str, model: nn.Module, metrics: dict[str, Any], **extra: Any) -> None:
        save_checkpoint(model, self.out / name, metrics=metrics, **self._ckpt_kwargs(), **self._extra(), **extra)

    # --- one epoch -------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, env, dev = self.config, self.env, self.device
        self.forward_model.train()
        order = env.shard(torch.randperm(len(self.data.train), generator=self.gens.data))  # (n_local,)
        k = self.data.num_classes
        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss * n, correct, n
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        show = cfg.progress and env.is_main
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="step",
                   disable=not show, dynamic_ncols=True, file=sys.stderr)
        start = time.perf_counter()
        for i in range(self.steps_per_epoch):
            idx = order[i * self.local_batch : (i + 1) * self.local_batch].to(dev, non_blocking=True)
            y = self.train_labels[idx]  # (B,)
            x = self.augment(self.train_images[idx].float().div_(255.0), generator=self.gens.aug)  # (B, 3, H, W)
            target: torch.Tensor = y
            if mixing:
                x, target = mixup_cutmix(x, y, k, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                                         generator=self.gens.aug)  # target: (B, K) soft
            x = normalize(x, self.data.mean, self.data.std)  # (B, 3, H, W)
            if cfg.random_erase > 0:  # after normalisation: 0 fills with the mean colour, as in timm
                x = random_erase(x, cfg.random_erase, generator=self.gens.aug)
            x = x.contiguous(memory_format=self.memory_format)
            lr = lr_at(self.state.global_step, self.total_steps, peak=cfg.lr, schedule=cfg.schedule,
                       warmup_steps=self.warmup_steps, min_lr=cfg.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with autocast(dev, self.amp_dtype):
                logits = self.forward_model(x)  # (B, K)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
            if self.teacher is not None:
                soft = distillation_loss(logits, self.teacher(x), cfg.distill_temperature)
                loss = (1.0 - cfg.distill_alpha) * loss + cfg.distill_alpha * soft
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, self.state.global_step)
            self.state.global_step += 1

            loss = loss.detach()
            bad |= ~torch.isfinite(loss)
            sums += torch.stack([loss.double() * y.numel(), (logits.argmax(-1) == y).sum().double(),
                                 torch.tensor(float(y.numel()), dtype=torch.float64, device=dev)])
            if (i + 1) % self.check_every == 0 or i + 1 == self.steps_per_epoch:
                self._check_finite(bad, epoch, f"step {i + 1}")
            if show and ((i + 1) % 5 == 0 or i + 1 == self.steps_per_epoch):
                s = sums.tolist()
                rate = s[2] * env.world_size / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{s[1] / s[2]:.3f}", img_s=f"{rate:.0f}",
                                lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
        bar.close()
        env.all_reduce_sum(sums)
        elapsed = time.perf_counter() - start
        loss_sum, correct, n = sums.tolist()
        return {"lr": lr, "train_loss": loss_sum / n, "train_accuracy": correct / n, "images_per_s": n / elapsed}

    def _check_finite(self, bad: torch.Tensor, epoch: int, where: str) -> None:
        flag = self.env.all_reduce_sum(bad.to(torch.int32).clone())
        if int(flag) > 0:
            kept = f"The last good checkpoints in {self.out} are kept" if self.state.epoch else "Nothing was saved"
            raise TrainingError(
                f"the training loss became non-finite (NaN or inf) in epoch {epoch + 1}, {where}; stopping. {kept}. "
                f"Lower the learning rate (now {self.config.lr:g}), keep gradient clipping on (--clip-grad), or try "
                "--amp off."
            )

    def _validate(self) -> dict[str, Any]:
        val = self.data.val
        shard = torch.arange(self.env.rank, len(val), self.env.world_size)  # no padding: sums are exact
        cm, loss_sum = confusion_and_loss(
            self.eval_model, val.images[shard], val.labels[shard], num_classes=self.data.num_classes,
            mean=self.data.mean, std=self.data.std, batch_size=self.config.eval_batch_size, device=self.device,
            amp_dtype=self.amp_dtype, channels_last=self.memory_format == torch.channels_last,
        )
        self.env.all_reduce_sum(cm)
        self.env.all_reduce_sum(loss_sum)
        report = classification_report(cm, self.data.class_names)
        return {"loss": float(loss_sum) / max(len(val), 1), **report}

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> TrainResult:
        cfg, env = self.config, self.env
        if self.resuming:
            self._say(f"resuming {self.out} after epoch {self.state.epoch}/{cfg.epochs}")
            if env.is_main:
                self._repair_last()
        else:
            self._say(f"training {cfg.model} ({self.family}, {self.num_params / 1e6:.2f} M parameters) on "
                      f"{self.data.name} ({len(self.data.train)} train / {len(self.data.val)} val images, "
                      f"{_img_size(self.model_cfg)} px) for {cfg.epochs} epochs on {self.device}"
                      + (f" x {env.world_size} processes" if env.enabled else ""))
        stop = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
        for epoch in range(self.state.epoch, stop):
            start, cpu_start = time.perf_counter(), time.process_time()
            row = self._train_epoch(epoch)
            val = self._validate()
            if not math.isfinite(val["loss"]):
                self._check_finite(torch.ones((), dtype=torch.bool), epoch, "in validation")
            self.state.train_time_s += time.perf_counter() - start
            self.state.cpu_time_s += time.process_time() - cpu_start
            row = {"epoch": epoch + 1, **row, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "val_macro_f1": val["macro_f1"], "epoch_time_s": time.perf_counter() - start,
                   "elapsed_s": self.state.train_time_s, "cpu_s": self.state.cpu_time_s}
            self.state.history.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
            self.state.epoch = epoch + 1
            self._end_epoch(val)
            self._say(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc "
                      f"{row['train_accuracy']:.2%}  val loss {val['loss']:.4f} acc {val['accuracy']:.2%} "
                      f"f1 {val['macro_f1']:.4f}  {row['images_per_s']:.0f} img/s  {row['epoch_time_s']:.1f} s")
            if on_epoch_end is not None and env.is_main:
                on_epoch_end(row)
        if self.state.epoch < cfg.epochs:
            self._say(f"stopped after epoch {self.state.epoch}/{cfg.epochs}; continue with --resume")
            return self._result(finished=False, test=None)
        test = self._finalize() if env.is_main else None
        env.barrier()
        return self._result(finished=True, test=test)

    def _end_epoch(self, val: dict[str, Any]) -> None:
        best, select = self.state.best, self.config.select
        if best is None or select == "last":
            improved = True
        elif select == "val_loss":
            improved = val["loss"] < best["val_loss"]
        else:
            improved = val["accuracy"] > best["val_accuracy"] or (
                val["accuracy"] == best["val_accuracy"] and val["loss"] < best["val_loss"])
        metrics = {"epoch": self.state.epoch, **{f"val_{k}": val[k] for k in _SCALARS}}
        if improved:
            self.state.best = {"epoch": self.state.epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
            if self.env.is_main:
                self._save(BEST, self.eval_model, metrics)
        # The sidecar is the resume point: written after best (a kill in between re-runs this epoch,
        # which re-creates the same best) and before last (a kill in between is repaired on resume).
        save_state(self.out / STATE, model=self.model, optimizer=self.optimizer, gens=self.gens, state=self.state,
                   config=self.config.to_dict(), env=self.env, device=self.device,
                   ema=None if self.ema is None else self.ema.module)
        if self.env.is_main:
            self._save(LAST, self.eval_model, metrics)
            _write_jsonl(self.out / LOG, self.state.history)

    def _repair_last(self) -> None:
        """After a kill between the sidecar and ``last`` writes, ``last`` lags one epoch: rewrite it."""
        try:
            if read_checkpoint_meta(self.out / LAST).extra.get("epochs_done") == self.state.epoch:
                return
        except VitvizError:  # missing or unreadable: rewrite it from the sidecar
            pass
        row = self.state.history[-1] if self.state.history else {}
        metrics = {"epoch": self.state.epoch, "val_loss": row.get("val_loss"),
                   "val_accuracy": row.get("val_accuracy"), "val_macro_f1": row.get("val_macro_f1")}
        self._save(LAST, self.eval_model, metrics)
        _write_jsonl(self.out / LOG, self.state.history)

    def _finalize(self) -> dict[str, Any]:
        """Evaluate the best checkpoint on the test split and store the result in it (idempotent)."""
        best_model, meta = load_checkpoint(self.out / BEST, device=self.device)
        best_model = best_model.to(memory_format=self.memory_format)
        test = evaluate(best_model, self.data.test, mean=self.data.mean, std=self.data.std,
                        class_names=self.data.class_names, batch_size=self.config.eval_batch_size,
                        device=self.device, amp_dtype=self.amp_dtype,
                        channels_last=self.memory_format == torch.channels_last)
        metrics = {**(meta.metrics or {}), **{f"test_{k}": test[k] for k in _SCALARS},
                   "test_num_samples": test["num_samples"], "train_time_s": round(self.state.train_time_s, 3),
                   "cpu_time_s": round(self.state.cpu_time_s, 3)}
        ood = calibrate_ood(best_model, self.data.train.images, self.data.val.images, mean=self.data.mean,
                            std=self.data.std, batch_size=self.config.eval_batch_size,
                            views=upload_views(self.data.name, self.data.train.images, self.data.val.images),
                            ) if len(self.data.val) else None
        self._save(BEST, best_model, metrics, ood=ood, test_per_class=test["per_class"],
                   confusion_matrix=test["confusion_matrix"])
        summary = {"model": self.config.model, "family": self.family, "dataset": self.data.name,
                   "num_params": self.num_params, "num_train": len(self.data.train), "best_epoch": metrics.get("epoch"),
                   "metrics": metrics,
                   "test": test, "curves": self.state.history, "train_config": self.config.to_dict()}
        _write_text(self.out / RESULTS, json.dumps(summary, indent=1))
        self._say(f"best epoch {metrics.get('epoch')}: val acc {metrics.get('val_accuracy', 0):.2%}, test acc "
                  f"{test['accuracy']:.2%} (macro F1 {test['macro_f1']:.4f}) -> {self.out / BEST}  "
                  f"[{self.state.train_time_s:.0f} s wall, {self.state.cpu_time_s:.0f} s CPU]")
        return test

    def _result(self, *, finished: bool, test: dict[str, Any] | None) -> TrainResult:
        best = self.state.best or {}
        return TrainResult(out=self.out, finished=finished, epochs_done=self.state.epoch,
                           best_epoch=best.get("epoch"), val_accuracy=best.get("val_accuracy"), test=test,
                           train_time_s=self.state.train_time_s, cpu_time_s=self.state.cpu_time_s,
                           num_params=self.num_params,
                           history=list(self.state.history))


_SCALARS = ("loss", "accuracy", "macro_precision", "macro_recall", "macro_f1")


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    # Rewritten whole from the sidecar's history: after a resume it never holds a row twice.
    _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
