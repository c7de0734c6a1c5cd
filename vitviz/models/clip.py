"""CLIP with typed prompts: the classes are texts, the logits are image–text similarities.

:class:`PromptClassifier` turns an image encoder and a text encoder into a classifier over the
prompts the user types ("a dog", "a red car"): ``logits = scale * cos(image_embedding, text_embedding)``
(+ ``bias`` for SigLIP), which is what open_clip's and transformers' own models return as their
image-to-text logits. Every gradient method therefore explains the similarity of the chosen prompt,
and softmax over the logits gives the zero-shot probabilities CLIP reports.

The text side is encoded once, when the prompts are set, without gradients: explanations ask where
in the *image* a prompt is seen.

``vitviz.create_model("open_clip:<arch>", pretrained=..., prompts=[...])`` builds one from open_clip
(:func:`load_open_clip`); a Hugging Face CLIP / SigLIP folder does through ``hf:`` with ``prompts``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ConfigError, WeightsUnavailableError

__all__ = ["DEFAULT_PROMPTS", "MAX_PROMPTS", "OPEN_CLIP_PREFIX", "PromptClassifier", "check_prompts",
           "hf_text_encoder", "load_open_clip", "open_clip_advice"]

OPEN_CLIP_PREFIX = "open_clip:"
MAX_PROMPTS = 64  # one text forward each at set-up; one logit each per image
DEFAULT_PROMPTS: tuple[str, ...] = ("a photo of a dog", "a photo of a cat", "a photo of a car")

TextEncoder = Callable[[list[str]], torch.Tensor]  # prompts -> (P, E) text embeddings


def check_prompts(prompts: Sequence[str] | str, where: str = "prompts") -> list[str]:
    """Prompts as a clean list: stripped, non-empty, distinct, at most :data:`MAX_PROMPTS`; ConfigError otherwise."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence):
        raise ConfigError(f"{where} must be a list of texts, got {type(prompts).__name__}.")
    clean = [str(p).strip() for p in prompts]
    if not clean or not all(clean):
        raise ConfigError(f"{where}: give at least one non-empty prompt, e.g. \"a photo of a dog\".")
    repeated = sorted({p for p in clean if clean.count(p) > 1})
    if repeated:
        raise ConfigError(f"{where}: each prompt is a class and must appear once; repeated: {', '.join(repeated)}.")
    if len(clean) > MAX_PROMPTS:
        raise ConfigError(f"{where}: at most {MAX_PROMPTS} prompts, got {len(clean)}.")
    return clean


class L2Normalize(nn.Module):
    """``x / ||x||`` over the last axis, as a module so that explanation rules can attach to it (AttnLRP)."""

    eps = 1e-12  # F.normalize's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, eps=self.eps)


class PromptClassifier(nn.Module):
    """Zero-shot classification over typed prompts: (B, 3, H, W) -> (B, prompts) similarity logits.

    ``encoder`` maps images to image embeddings (B, E); ``encode_text`` maps prompts to text
    embeddings (P, E). ``logit_scale`` is the temperature the model learned (already exponentiated),
    ``logit_bias`` SigLIP's learned bias (None for CLIP).
    """

    def __init__(self, encoder: nn.Module, encode_text: TextEncoder, prompts: Sequence[str], *,
                 logit_scale: float, logit_bias: float | None = None, preprocessing: dict[str, Any],
                 source: str, text_model: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.text_model = text_model  # kept so that .to(device) moves the text side too
        self._encode_text = encode_text
        self.logit_scale = float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self.preprocessing = dict(preprocessing)
        self.source = source
        self.normalize = L2Normalize()
        self.register_buffer("text_features", torch.zeros(0), persistent=False)
        self.prompts: list[str] = []
        self.set_prompts(prompts)

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.prompts)

    has_head = True  # the prompts are the classes

    def set_prompts(self, prompts: Sequence[str]) -> None:
        """Encode ``prompts`` (once, without gradients) and make them the classes."""
        clean = check_prompts(prompts)
        device = next(self.encoder.parameters()).device
        with torch.no_grad():
            text = self._encode_text(clean).to(device).float()  # (P, E)
        self.text_features = F.normalize(text, dim=-1)  # (P, E)
        self.prompts = clean

    def with_prompts(self, prompts: Sequence[str]) -> PromptClassifier:
        """Another classifier over ``prompts`` sharing this one's encoders (only the texts are encoded)."""
        return PromptClassifier(self.encoder, self._encode_text, prompts, logit_scale=self.logit_scale,
                                logit_bias=self.logit_bias, preprocessing=self.preprocessing, source=self.source,
                                text_model=self.text_model).eval()

    def similarity(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, E) image embeddings -> (B, P) logits: scale * cosine similarity (+ bias)."""
        image = self.normalize(image_embeds.to(torch.promote_types(image_embeds.dtype, torch.float32)))  # (B, E)
        logits = self.logit_scale * image @ self.text_features.to(image).t()  # (B, P)
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.similarity(self.encoder(x))  # (B, P)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, prompts={self.prompts!r}"


# --------------------------------------------------------------------------------------------------
# open_clip


def _open_clip() -> Any:
    try:
        import open_clip
    except ModuleNotFoundError as err:
        raise ConfigError("open_clip: models need the open_clip package: pip install -e \".[clip]\" "
                          "(or pip install open_clip_torch).") from err
    return open_clip


WHERE: dict[str, str] = {
    "api": "pass pretrained=\"/path/to/open_clip_model.safetensors\" to vitviz.create_model",
    "cli": "pass --pretrained-file /path/to/open_clip_model.safetensors",
    "dashboard": "enter its path in the sidebar's \"Weights file\" field",
}


def open_clip_advice(arch: str, tag: str, where: str = "api") -> str:
    """How to supply open_clip weights ``arch``/``tag`` without network, in the words of ``where``."""
    if where not in WHERE:
        raise ConfigError(f"where must be one of {', '.join(WHERE)}, got {where!r}.")
    cfg = _open_clip().get_pretrained_cfg(arch, tag) or {}
    repo = str(cfg.get("hf_hub", "")).rstrip("/")
    if repo:
        page = f"https://huggingface.co/{repo}"
        return (f"Download open_clip_model.safetensors (or open_clip_pytorch_model.bin) from {page} on a machine "
                f"with network, copy it here and {WHERE[where]}.")
    return f"open_clip downloads these weights from {cfg.get('url', 'its model zoo')}; copy the file here and " \
           f"{WHERE[where]}."


class _OpenClipNoise(logging.Filter):
    """Drops what open_clip logs on the root logger while vitviz loads a model: vitviz says it better itself
    (random weights were asked for; a failed download becomes a WeightsUnavailableError with advice)."""

    NOISE = ("No pretrained weights loaded for model", "Failed to download weights for tag")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    noise, root = _OpenClipNoise(), logging.getLogger()
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)


def load_open_clip(arch: str, *, pretrained: str | os.PathLike | None = None, prompts: Sequence[str] | None = None,
                   progress: Callable[[str], None] | None = None, **kwargs: Any) -> PromptClassifier:
    """An open_clip model as a :class:`PromptClassifier` over ``prompts`` (default :data:`DEFAULT_PROMPTS`).

    ``pretrained``: an open_clip tag ("openai", "laion2b_s34b_b79k", ...), a weights file, or None for
    random weights. Tokenizers of OpenAI-style models ship with open_clip; others come from the Hub.
    ``kwargs`` go to ``open_clip.create_model`` (e.g. ``force_image_size``).
    """
    open_clip = _open_clip()
    if arch not in open_clip.list_models():
        raise ConfigError(f"open_clip has no model {arch!r}; pick one of open_clip.list_models(), e.g. ViT-B-32.")
    tag = None if pretrained is None else str(pretrained)
    if tag is not None and not Path(tag).expanduser().is_file():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            looks_like_path = any(c in tag for c in "/\\.") or Path(tag).suffix
            if looks_like_path:
                raise WeightsUnavailableError(f"pretrained file {tag} does not exist.")
            raise ConfigError(f"open_clip has no pretrained tag {tag!r} for {arch}; tags: {', '.join(tags) or 'none'}.")
    if progress is not None:
        progress(f"building open_clip {arch}" + (f" ({tag})" if tag else " (random weights)"))
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(arch, pretrained=str(Path(tag).expanduser()) if tag and Path(
                tag).expanduser().is_file() else tag, **kwargs)
    except (OSError, RuntimeError) as err:
        if tag is not None and not Path(tag).expanduser().is_file():
            raise WeightsUnavailableError(
                f"open_clip:{arch} weights {tag!r} are not on this machine and cannot be downloaded. "
                f"{open_clip_advice(arch, tag)}", model_name=f"open_clip:{arch}") from err
        raise ConfigError(f"open_clip:{arch}: cannot load {tag}: {str(err).splitlines()[0]}") from err
    model.eval()
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except OSError as err:
        hub = ((open_clip.get_model_config(arch) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
        fetch = (f"`hf download {hub}` on a machine with network puts it into the Hugging Face cache, which runs "
                 "here find once it is copied to this machine's HF_HOME; or " if hub else "")
        raise WeightsUnavailableError(f"open_clip:{arch}'s tokenizer comes from the Hugging Face Hub, which cannot "
                                      f"be reached. {fetch}pick a model with the bundled CLIP tokenizer "
                                      "(e.g. ViT-B-32).", model_name=f"open_clip:{arch}") from err
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", 224)
    preprocessing = {"mean": tuple(pre["mean"]), "std": tuple(pre["std"]),
                     "img_size": int(size[0] if isinstance(size, (list, tuple)) else size)}

    def encode_text(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts).to(next(model.parameters()).device)  # (P, context)
        return model.encode_text(tokens)  # (P, E)

    bias = getattr(model, "logit_bias", None)
    classifier = PromptClassifier(
        model.visual, encode_text, list(prompts) if prompts is not None else list(DEFAULT_PROMPTS),
        logit_scale=model.logit_scale.detach().exp().item(), logit_bias=None if bias is None else bias.detach().item(),
        preprocessing=preprocessing, source=f"open_clip:{arch}" + (f":{tag}" if tag else ""), text_model=model)
    return classifier.eval()


# --------------------------------------------------------------------------------------------------
# transformers


def hf_text_encoder(hf: nn.Module, tokenizer: Any) -> tuple[TextEncoder, float, float | None]:
    """A CLIPModel / SiglipModel's text encoder over prompts, its logit scale and (SigLIP) bias."""
    siglip = "siglip" in str(hf.config.model_type)

    def encode_text(texts: list[str]) -> torch.Tensor:
        # SigLIP was trained on max-length padded texts; CLIP pools at the end-of-text token
        batch = tokenizer(texts, padding="max_length" if siglip else True, truncation=True, return_tensors="pt")
        batch = {k: v.to(next(hf.parameters()).device) for k, v in batch.items()}
        out = hf.text_model(**batch).pooler_output  # (P, D)
        projection = getattr(hf, "text_projection", None)
        return projection(out) if projection is not None else out  # (P, E)

    bias = getattr(hf, "logit_bias", None)
    return encode_text, hf.logit_scale.detach().exp().item(), None if bias is None else bias.detach().item()
