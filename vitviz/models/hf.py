"""Hugging Face ``transformers`` image models as vitviz models: ``create_model("hf:<hub id or folder>")``.

:class:`HFImageModel` wraps a transformers model so that it behaves like every other vitviz model:
a (B, 3, H, W) batch in, a (B, classes) tensor out (logits; for a model without a classifier, its
pooled features or image embedding), with ``num_classes``, ``class_names`` and the ``preprocessing``
(mean, std, input size) it was trained with. The model itself is kept whole, as ``.hf``, with the
attention implementation it was loaded with; the explanation adapters
(:mod:`vitviz.explain.adapters.hf_vit`, :mod:`~vitviz.explain.adapters.hf_swin`) switch it to the
eager path for the calls they record.

Covered: ViT, DeiT (with and without the distillation head), BEiT, DINOv2 (with and without
registers), Swin, and CLIP / SigLIP image towers, from ``*ForImageClassification`` (CLIP and SigLIP
fine-tunes included: classifiers with their own labels), the bare ``*Model``,
``CLIPVisionModelWithProjection`` (its projected ``image_embeds``) and the dual-encoder ``CLIPModel`` /
``SiglipModel`` checkpoints. A dual encoder with ``prompts`` becomes a
:class:`~vitviz.models.clip.PromptClassifier` whose classes are the prompts.

Weights come from a local folder (``save_pretrained`` layout), the local Hugging Face cache, or a
download through transformers' own loader when the Hub can be reached. Offline with none of these,
:class:`~vitviz.errors.WeightsUnavailableError` says how to get the folder onto this machine, in the
words of the front end the user is in (:func:`hf_advice`).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitviz.errors import ConfigError, WeightsUnavailableError
from vitviz.images import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["HF_PREFIX", "HFImageModel", "SUPPORTED_TYPES", "config_cached", "hf_advice", "is_dual", "load_hf_model",
           "with_prompts"]

HF_PREFIX = "hf:"

# model_type (config.json) -> what it is; vision sub-configs of dual encoders appear under their own type.
SUPPORTED_TYPES: dict[str, str] = {
    "vit": "ViT", "deit": "DeiT", "beit": "BEiT", "dinov2": "DINOv2", "dinov2_with_registers": "DINOv2 with registers",
    "swin": "Swin", "clip": "CLIP", "clip_vision_model": "CLIP image tower", "siglip": "SigLIP",
    "siglip_vision_model": "SigLIP image tower",
}
_DUAL = ("clip", "siglip")

# Preprocessing when a folder carries no preprocessor_config.json: the values the reference checkpoints use.
_IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_DEFAULT_STATS = {"vit": _HALF, "beit": _HALF, "siglip": _HALF, "siglip_vision_model": _HALF, "clip": _CLIP,
                  "clip_vision_model": _CLIP}

WHERE: dict[str, str] = {
    "api": "pass that folder as vitviz.create_model(\"hf:/path/to/folder\")",
    "cli": "pass --model hf:/path/to/folder",
    "dashboard": "enter the folder's path in the sidebar's \"Hugging Face model\" field",
}


def hf_advice(source: str, where: str = "api") -> str:
    """How to get ``source``'s files onto an offline machine, in the words of ``where`` ("api", "cli", "dashboard")."""
    if where not in WHERE:
        raise ConfigError(f"where must be one of {', '.join(WHERE)}, got {where!r}.")
    # `hf` is huggingface_hub's command line (>= 1.0; it replaced `huggingface-cli`)
    return (f"When this machine has network, `hf download {source}` puts it into the local Hugging Face cache, "
            f"where later runs find it offline. Otherwise run `hf download {source} --local-dir "
            f"{Path(source).name}` on a machine with network (or model.save_pretrained(folder) after "
            f"from_pretrained), copy the folder here and {WHERE[where]}.")


class HFImageModel(nn.Module):
    """A transformers image model: images in, logits (or pooled features when it has no classifier) out.

    ``output`` says what :meth:`forward` returns: "logits" (a classifier), "pooled" (the model's pooled
    output: class token, attention pool, mean of the last stage) or "image_embeds" (a dual encoder's
    or ``CLIPVisionModelWithProjection``'s image embedding, as ``get_image_features`` computes it).
    """

    def __init__(self, hf: nn.Module, *, source: str, output: str, preprocessing: dict[str, Any]) -> None:
        super().__init__()
        self.hf = hf
        self.source = source
        self.output = output
        self.preprocessing = dict(preprocessing)
        config = hf.config
        self.model_type = str(config.model_type)
        self.vision_config = getattr(config, "vision_config", None) or config
        labels = getattr(config, "id2label", None) or {}
        self.num_classes = len(labels) if output == "logits" else 0
        self.class_names: tuple[str, ...] = tuple(str(labels[i]) for i in range(self.num_classes)) if labels else ()
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(self.vision.forward).parameters

    @property
    def vision(self) -> nn.Module:
        """The module that runs the image encoder: the ``vision_model`` of a dual encoder, a CLIP / SigLIP
        classifier or a tower with projection; else the model itself."""
        tower = getattr(self.hf, "vision_model", None)
        return tower if isinstance(tower, nn.Module) else self.hf

    @property
    def has_head(self) -> bool:
        return self.output == "logits"

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.vision_config, "image_size", 224)
        return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))

    @property
    def patch_size(self) -> tuple[int, int]:
        size = getattr(self.vision_config, "patch_size", 16)
        return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))

    def _kwargs(self, x: torch.Tensor) -> dict[str, Any]:
        # ViT-style embeddings refuse another input size unless asked to interpolate their positions
        if self._interpolate and tuple(x.shape[-2:]) != self.image_size:
            return {"interpolate_pos_encoding": True}
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, classes) logits, or (B, D) pooled features / image embeddings."""
        if self.output == "image_embeds":  # the image embedding, as get_image_features computes it
            # CLIP: the post-norm class token, projected; SigLIP: the attention pool (no projection)
            pooled = self.vision(pixel_values=x, **self._kwargs(x)).pooler_output  # (B, D)
            projection = getattr(self.hf, "visual_projection", None)
            return projection(pooled) if projection is not None else pooled  # (B, E)
        out = self.hf(pixel_values=x, **self._kwargs(x))
        if self.output == "logits":
            return out.logits  # (B, classes)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # no pooler: the class token (or the token mean when there is none)
            hidden = out.last_hidden_state  # (B, N, D)
            pooled = hidden[:, 0] if self.model_type not in ("siglip", "siglip_vision_model") else hidden.mean(1)
        return pooled.flatten(1)  # (B, D)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, type={self.model_type}, output={self.output}"


# --------------------------------------------------------------------------------------------------
# loading


def load_hf_model(source: str | os.PathLike, *, prompts: Sequence[str] | None = None, pretrained: bool = True,
                  progress: Callable[[str], None] | None = None, **config_overrides: Any) -> nn.Module:
    """Load ``source`` (a Hub id or a local ``save_pretrained`` folder) as an :class:`HFImageModel`.

    ``prompts`` (CLIP / SigLIP dual encoders only) make a :class:`~vitviz.models.clip.PromptClassifier`
    whose classes are those texts. ``pretrained=False`` builds the architecture from its config with
    random weights. ``config_overrides`` go to the config (e.g. ``attn_implementation="eager"``).
    """
    transformers = _transformers()
    source = str(source)
    local = Path(source).expanduser()
    where = str(local) if local.is_dir() else source
    if progress is not None:
        progress(f"loading Hugging Face model {source}")
    # Offline, look only in the local cache: transformers would otherwise retry the Hub before failing.
    offline = where == source and not local.is_dir() and not _hub_reachable()
    config = _config(transformers, where, source, offline)
    model_type = str(config.model_type)
    if model_type not in SUPPORTED_TYPES:
        raise ConfigError(
            f"hf:{source} is a {model_type!r} model; vitviz explains these Hugging Face image models: "
            f"{', '.join(sorted(set(SUPPORTED_TYPES.values())))}. Use a timm name (timm:<name>) for other families.")
    cls = _model_class(transformers, config)
    if prompts is not None and not _dual_class(model_type, cls.__name__):
        raise _no_prompts(source, model_type, cls.__name__, config)
    attn = config_overrides.pop("attn_implementation", None)
    kwargs: dict[str, Any] = {"attn_implementation": attn} if attn else {}
    if offline:
        kwargs["local_files_only"] = True
    try:
        if pretrained:
            hf = cls.from_pretrained(where, **kwargs, **config_overrides)
        else:
            for key, value in config_overrides.items():
                setattr(config, key, value)
            hf = cls._from_config(config, **({"attn_implementation": attn} if attn else {}))
    except OSError as err:
        raise _unavailable(source, err) from err
    hf.eval()
    output = _output_kind(hf, config)
    model = _named(type(hf).__name__)(hf, source=source, output=output,
                                      preprocessing=_preprocessing(transformers, where, config))
    model.eval()
    return model if prompts is None else with_prompts(model, prompts)


def is_dual(model: nn.Module) -> bool:
    """Whether ``model`` is an :class:`HFImageModel` of a CLIP / SigLIP dual encoder (so prompts apply)."""
    return isinstance(model, HFImageModel) and _dual_class(model.model_type, type(model.hf).__name__)


def _dual_class(model_type: str, class_name: str) -> bool:
    # a CLIP / SigLIP fine-tune (``*ForImageClassification``) shares the dual encoder's config but has no text side
    return model_type in _DUAL and not class_name.endswith("ForImageClassification")


def _no_prompts(source: str, model_type: str, class_name: str, config: Any) -> ConfigError:
    """The refusal of prompts for a model that has no text encoder, with what to do instead."""
    if model_type in _DUAL:  # a CLIP / SigLIP classifier: it has classes of its own
        labels = [str(v) for _, v in sorted((getattr(config, "id2label", None) or {}).items())]
        shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
        return ConfigError(f"hf:{source} is a {class_name}: it already has {len(labels)} classes of its own "
                           f"({shown}) and no text encoder for prompts. Leave the prompts out to use its classes, "
                           "or load a CLIPModel / SiglipModel checkpoint to classify by prompts.")
    return ConfigError(f"prompts need a CLIP or SigLIP model with its text encoder; hf:{source} is "
                       f"{SUPPORTED_TYPES.get(model_type, model_type)}.")


def with_prompts(model: HFImageModel, prompts: Sequence[str]) -> nn.Module:
    """A :class:`~vitviz.models.clip.PromptClassifier` over ``prompts`` on a loaded CLIP / SigLIP (weights shared)."""
    from vitviz.models.clip import PromptClassifier, hf_text_encoder

    if not is_dual(model):
        raise _no_prompts(model.source, model.model_type, type(model.hf).__name__, model.hf.config)
    local = Path(model.source).expanduser()
    where = str(local) if local.is_dir() else model.source
    offline = not local.is_dir() and not _hub_reachable()
    encode_text, scale, bias = hf_text_encoder(model.hf, _tokenizer(_transformers(), where, model.source, offline))
    return PromptClassifier(model, encode_text, list(prompts), logit_scale=scale, logit_bias=bias,
                            preprocessing=model.preprocessing, source=f"hf:{model.source}").eval()


def config_cached(source: str) -> bool:
    """Whether Hub id ``source``'s config.json is in the local Hugging Face cache: then random weights
    (``pretrained=False``) can be built offline; without it, even they need the Hub."""
    from vitviz.models.pretrained import hub_cache_dir

    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json", cache_dir=str(hub_cache_dir()))
    except (ImportError, ValueError):  # no hub client, or not a repo id
        return False
    return isinstance(found, str)  # a non-str sentinel means "known to be missing"


@functools.cache
def _named(architecture: str) -> type[HFImageModel]:
    """An :class:`HFImageModel` subclass named after the transformers class it wraps, so that every message
    that names a model's class (refusals, errors) names the architecture the user loaded."""
    return type(architecture, (HFImageModel,), {"__module__": __name__, "__doc__": HFImageModel.__doc__})


def _transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError as err:
        raise ConfigError("hf: models need the transformers package: pip install -e \".[hf]\" "
                          "(or pip install transformers).") from err
    return transformers


def _hub_reachable() -> bool:
    from vitviz.models.pretrained import hub_reachable

    return hub_reachable()


def _config(transformers: Any, where: str, source: str, offline: bool) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(where, **({"local_files_only": True} if offline else {}))
    except OSError as err:
        raise _unavailable(source, err) from err
    except ValueError as err:  # no model_type, or a type this transformers does not know
        if Path(where).is_dir():
            raise _unavailable(source, err) from err
        raise ConfigError(f"hf:{source}: {err}") from err


def _unavailable(source: str, err: BaseException) -> Exception:
    local = Path(source).expanduser()
    if local.exists() and not local.is_dir():
        return ConfigError(f"hf:{source} is a file; give the folder that holds config.json and the weights.")
    if local.is_dir():
        return ConfigError(f"hf:{source} is a folder without a loadable model (config.json plus "
                           f"model.safetensors): {str(err).splitlines()[0]}")
    if "/" not in source or source.startswith((".", "/", "~")):
        return ConfigError(f"hf:{source}: no such folder. Give a local folder saved with save_pretrained, or a "
                           "Hugging Face hub id such as google/vit-base-patch16-224.")
    return WeightsUnavailableError(
        f"hf:{source} is not on this machine and the Hugging Face Hub cannot be reached. {hf_advice(source)}",
        model_name=f"hf:{source}", hub_id=source)


def _model_class(transformers: Any, config: Any) -> Any:
    """The class config.json names (``architectures``), else the bare model of its type."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


def _output_kind(hf: nn.Module, config: Any) -> str:
    name = type(hf).__name__
    if name.endswith("ForImageClassification") or "WithTeacher" in name:
        return "logits"
    # a dual encoder, or a tower with its projection (CLIPVisionModelWithProjection): no pooler_output, and the
    # embedding is the projected post-norm class token, not the raw class token
    if _dual_class(str(config.model_type), name) or isinstance(getattr(hf, "visual_projection", None), nn.Module):
        return "image_embeds"
    return "pooled"


def _preprocessing(transformers: Any, where: str, config: Any) -> dict[str, Any]:
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    mean, std = _DEFAULT_STATS.get(str(config.model_type), _IMAGENET)
    if Path(where, "preprocessor_config.json").is_file():
        import json

        proc = json.loads(Path(where, "preprocessor_config.json").read_text())
        mean = tuple(proc.get("image_mean", mean))
        std = tuple(proc.get("image_std", std))
        crop = proc.get("crop_size") or {}
        size = int(crop.get("height", size) if isinstance(crop, dict) else crop)
    return {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std), "img_size": size}


def _tokenizer(transformers: Any, where: str, source: str, offline: bool) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(where, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError) as err:
        raise ConfigError(f"hf:{source} has no tokenizer files, which prompts need: save the tokenizer into the "
                          "folder too (AutoProcessor.from_pretrained(id).save_pretrained(folder)).") from err
