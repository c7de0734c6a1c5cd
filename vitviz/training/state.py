"""The training-state sidecar: everything ``--resume`` needs, in one safetensors file (no pickle).

``DIR/last.state.safetensors`` holds the model weights, AdamW's moments and step counts, and every
random generator's state of every rank (torch's global CPU and CUDA generators, which drive dropout
and stochastic depth, plus the data-order and augmentation generators), as tensors; the epoch, the
global step, the curves so far, the best epoch and the training config are JSON metadata.

Because the sidecar carries the weights too, it alone defines the resume point: a run killed
between writing it and writing ``last.safetensors`` resumes from the sidecar and rewrites ``last``.
It is written with :func:`vitviz.checkpoint.write_safetensors_atomic`, so it is always whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitviz.checkpoint import read_safetensors, write_safetensors_atomic
from vitviz.errors import CheckpointError, TrainingError
from vitviz.training.distributed import DistEnv

STATE_KIND = "train_state"
STATE_VERSION = 1


@dataclass
class Generators:
    """The explicit generators of a run: data order (always CPU) and augmentation (on the device)."""

    data: torch.Generator
    aug: torch.Generator

    @classmethod
    def seeded(cls, seed: int, rank: int, device: torch.device) -> Generators:
        data = torch.Generator().manual_seed(seed)  # the same on every rank: one permutation, sharded
        aug = torch.Generator(device=device).manual_seed(seed * 1009 + 17 + rank)  # per rank: distinct draws
        return cls(data=data, aug=aug)


@dataclass
class TrainState:
    """Where a run stands after a completed epoch (what the sidecar stores)."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimiser steps taken
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per completed epoch
    best: dict[str, Any] | None = None  # {"epoch", "val_accuracy", "val_loss"} of the best epoch so far
    train_time_s: float = 0.0  # wall time spent in training epochs (validation included)
    cpu_time_s: float = 0.0  # CPU time of this process in those epochs: on a shared machine, what the run cost

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "global_step": self.global_step, "history": self.history,
                "best": self.best, "train_time_s": self.train_time_s, "cpu_time_s": self.cpu_time_s}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        return cls(epoch=int(data["epoch"]), global_step=int(data["global_step"]), history=list(data["history"]),
                   best=data.get("best"), train_time_s=float(data.get("train_time_s", 0.0)),
                   cpu_time_s=float(data.get("cpu_time_s", 0.0)))


def _rng_tensors(gens: Generators, device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state(), "data": gens.data.get_state(), "aug": gens.aug.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def save_state(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, gens: Generators,
               state: TrainState, config: dict[str, Any], env: DistEnv, device: torch.device,
               ema: nn.Module | None = None) -> None:
    """Write the sidecar (rank 0 writes; every rank must call, since RNG states are gathered).

    ``ema``: the weight average of a run with ``--ema``, stored beside the raw weights.
    """
    rng: dict[str, torch.Tensor] = {}
    for name, value in _rng_tensors(gens, device).items():
        # Generator states are fixed-size byte tensors, so one all_gather per generator suffices.
        comm = value.to(device) if env.enabled and device.type == "cuda" else value
        for rank, gathered in enumerate(env.all_gather(comm)):
            rng[f"rng.{rank}.{name}"] = gathered.cpu()
    if not env.is_main:
        return
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for index, slots in optimizer.state_dict()["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    tensors.update(rng)
    metadata = {"kind": STATE_KIND, "state_version": STATE_VERSION, "world_size": env.world_size,
                "config": config, **state.to_json()}
    write_safetensors_atomic(path, tensors, metadata)


def load_state(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, gens: Generators,
               env: DistEnv, device: torch.device, ema: nn.Module | None = None) -> TrainState:
    """Restore model, optimiser, weight average and this rank's generators; return the run's position."""
    tensors, meta = read_state(path)
    if meta.get("world_size") != env.world_size:
        raise TrainingError(
            f"{path} was written by a run with {meta.get('world_size')} process(es); resume it with the same "
            f"number (this one has {env.world_size}), since each process's random state is restored."
        )
    model_sd = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd, strict=True)
    except RuntimeError as err:
        raise TrainingError(f"{path} does not fit the model this run builds ({err}).") from err
    if ema is not None:
        ema_sd = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
        if not ema_sd:
            raise TrainingError(f"{path} holds no weight average, but this run has --ema; resume without it.")
        ema.load_state_dict(ema_sd, strict=True)
    opt_sd = optimizer.state_dict()
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    opt_sd["state"] = slots
    optimizer.load_state_dict(opt_sd)
    prefix = f"rng.{env.rank}."
    torch.set_rng_state(tensors[prefix + "cpu"])
    gens.data.set_state(tensors[prefix + "data"])
    gens.aug.set_state(tensors[prefix + "aug"])
    if device.type == "cuda" and prefix + "cuda" in tensors:
        torch.cuda.set_rng_state(tensors[prefix + "cuda"], device)
    return TrainState.from_json(meta)


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a sidecar, checked to be one."""
    try:
        tensors, meta = read_safetensors(path, "cpu")
    except CheckpointError as err:
        raise TrainingError(f"cannot resume: {err}") from err
    if meta.get("kind") != STATE_KIND or meta.get("state_version") != STATE_VERSION:
        raise TrainingError(
            f"{path} is not a vitviz training-state file of version {STATE_VERSION}; it cannot be resumed "
            "(start a new run with --overwrite)."
        )
    return tensors, meta


def model_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model state dict stored in a sidecar's tensors."""
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
