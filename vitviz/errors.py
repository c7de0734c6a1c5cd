"""The vitviz exception hierarchy: every error a user can cause is one of these.

Each message says what was wrong and what to do about it.
"""

from __future__ import annotations


class VitvizError(Exception):
    """Base class of every error vitviz raises on purpose."""


class ConfigError(VitvizError, ValueError):
    """A model, training or dataset setting is unknown or impossible."""


class CheckpointError(VitvizError):
    """A checkpoint file is missing, unreadable, unsafe or does not match its model."""


class InvalidImageError(VitvizError, ValueError):
    """Bytes or a file that are not an image we can safely decode."""


class DatasetError(VitvizError):
    """A dataset is unknown, missing on disk or malformed."""


class WeightsUnavailableError(VitvizError):
    """Pretrained weights cannot be had (offline, no file given).

    ``model_name`` (the timm name asked for) and ``hub_id`` (its Hugging Face repository), when known,
    let a front end re-word the advice (``vitviz.models.pretrained.weights_advice(name, where)``).
    """

    def __init__(self, message: str = "", *, model_name: str | None = None, hub_id: str | None = None) -> None:
        super().__init__(message)
        self.model_name = model_name
        self.hub_id = hub_id


class ExplainError(VitvizError, ValueError):
    """An explanation was asked for with parameters the model or method cannot take."""


class TrainingError(VitvizError):
    """Training cannot start or cannot go on (bad arguments, non-finite loss, ...)."""
