"""Training: ``train(TrainConfig(...))`` is what ``vitviz train`` runs (single process or under torchrun)."""

from vitviz.training.config import TrainConfig
from vitviz.training.loop import TrainResult, resolve_device, resolve_model, saved_config, train

__all__ = ["TrainConfig", "TrainResult", "resolve_device", "resolve_model", "saved_config", "train"]
