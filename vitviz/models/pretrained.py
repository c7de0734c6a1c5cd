"""Pretrained timm weights: a curated list, their Hub ids, and how to get weights onto a machine.

Weights for ``timm:<name>`` come, in this order, from a ``pretrained_file`` (safetensors only: vitviz
never unpickles a file it is handed), the local Hugging Face cache, or a download through timm's own
loader (into that same cache, with huggingface_hub's progress bar) when the Hub can be reached.
Offline with none of these, :class:`~vitviz.errors.WeightsUnavailableError` says where the file lives
and how to pass it, in the words of the front end the user is in (:func:`weights_advice`).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from vitviz.errors import ConfigError, WeightsUnavailableError

__all__ = ["CURATED", "WEIGHTS_FILE", "WHERE", "cached_weights", "hub_cache_dir", "hub_check", "hub_id",
           "hub_reachable", "load_pretrained", "load_weights_file", "pretrained_cfg", "weights_advice"]

_HUB_HOST = "huggingface.co"
_HUB_URL = f"https://{_HUB_HOST}"
WEIGHTS_FILE = "model.safetensors"  # the file every timm/ repository on the Hub carries

# name (with its pretrained tag) -> one line on what it is; every tag exists in timm 1.0.31 (a test checks).
CURATED: dict[str, str] = {
    "vit_base_patch16_224.augreg2_in21k_ft_in1k":
        "ViT-B/16 (the paper's architecture), ImageNet-21k pretrained with AugReg, fine-tuned on ImageNet-1k",
    "deit3_base_patch16_224.fb_in22k_ft_in1k":
        "DeiT-III ViT-B/16 with layer scale, ImageNet-22k pretrained, fine-tuned on ImageNet-1k, 1000 classes",
    "vit_small_patch14_reg4_dinov2.lvd142m":
        "DINOv2 ViT-S/14 with 4 register tokens, self-supervised on LVD-142M, 518 px: features, no classifier",
    "vit_base_patch16_clip_224.openai":
        "OpenAI CLIP ViT-B/16 image tower: 512-d image embeddings (CLIP's projection as head), no classifier",
    "vit_base_patch16_siglip_224.webli":
        "SigLIP ViT-B/16 image tower trained on WebLI: image embeddings from attention pooling, no classifier",
    "swin_tiny_patch4_window7_224.ms_in1k":
        "Swin-T: shifted-window hierarchical transformer, ImageNet-1k, 1000 classes",
    "convnext_tiny.in12k_ft_in1k":
        "ConvNeXt-T: a modernised CNN, ImageNet-12k pretrained, fine-tuned on ImageNet-1k, 1000 classes",
    "resnet50.a1_in1k":
        "ResNet-50 trained with timm's A1 recipe ('ResNet strikes back'), ImageNet-1k, 1000 classes",
}

# Where the user is, and how a weights file is handed over there.
WHERE: dict[str, str] = {
    "api": "pass pretrained_file=PATH to vitviz.create_model",
    "cli": "pass --pretrained-file PATH",
    "dashboard": "enter its path in the sidebar's \"Weights file\" field",
}


# --------------------------------------------------------------------------------------------------
# names and hub ids


def pretrained_cfg(name: str) -> Any:
    """timm's pretrained config of ``name`` (a bare name means timm's default tag); ConfigError if unknown."""
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ConfigError(
            f"unknown timm model {name!r}. Find names with timm.list_models('vit_*') (architectures) or "
            "timm.list_pretrained('vit_*') (with weights), or see vitviz.models.pretrained.CURATED."
        )
    try:
        cfg = timm.get_pretrained_cfg(name)
    except RuntimeError:  # timm's answer to a tag it does not know
        cfg = None
    if cfg is None and tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(
            f"timm has no pretrained tag {tag!r} for {arch}; its tags: {', '.join(tags) or 'none'}."
        )
    return cfg


def hub_id(name: str) -> str:
    """The Hugging Face repository of a timm model's weights, e.g. ``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``.

    Read from timm's pretrained config; a bare name resolves to timm's default tag. ConfigError for an
    unknown name or tag, WeightsUnavailableError when timm has no Hub weights for it.
    """
    repo = _hub_repo(pretrained_cfg(name))
    if repo is None:
        raise WeightsUnavailableError(
            f"timm has no pretrained weights on the Hugging Face Hub for {name!r}; pick a name from "
            "timm.list_pretrained() or use pretrained=False for random weights.",
            model_name=name,
        )
    return repo


def weights_advice(name: str, where: str = "api") -> str:
    """How to supply ``name``'s weights without network, in the words of ``where`` ("api", "cli", "dashboard")."""
    if where not in WHERE:
        raise ConfigError(f"where must be one of {', '.join(WHERE)}, got {where!r}.")
    cfg = pretrained_cfg(name)
    repo = _hub_repo(cfg)
    if repo is not None:
        page = f"{_HUB_URL}/{repo}"
        return (f"Download {WEIGHTS_FILE} from {page} (Files tab; direct link {page}/resolve/main/{WEIGHTS_FILE}) "
                f"on a machine with network, copy it here and {WHERE[where]}.")
    url = getattr(cfg, "url", None)
    if url:
        return (f"timm downloads these weights from {url}, a pickled PyTorch file: on a machine with network, "
                f"convert it to .safetensors (torch.load(..., weights_only=True), then safetensors.torch.save_file), "
                f"copy that here and {WHERE[where]}.")
    return f"timm has no pretrained weights for {name!r}; pick a name from timm.list_pretrained()."


def _hub_repo(cfg: Any) -> str | None:
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    repo = repo.split("@")[0]  # timm allows "repo@revision"
    if repo.endswith("/"):  # an organisation only: timm names the repository after the model
        tag = getattr(cfg, "tag", None)
        repo += f"{cfg.architecture}.{tag}" if tag else cfg.architecture
    return repo


# --------------------------------------------------------------------------------------------------
# where weights are


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder, read from the environment now (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME).

    huggingface_hub reads these once, at import; reading them per call keeps a changed environment honest.
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    try:
        from huggingface_hub import constants
    except ImportError:
        return Path.home() / ".cache" / "huggingface" / "hub"
    return Path(constants.HF_HUB_CACHE)


def cached_weights(repo: str) -> Path | None:
    """``model.safetensors`` of Hub repository ``repo`` already in the local Hugging Face cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, WEIGHTS_FILE, cache_dir=str(hub_cache_dir()))
    return Path(found) if isinstance(found, str) else None  # a non-str sentinel means "known to be missing"


def hub_check(environ: Mapping[str, str] | None = None) -> tuple[str, tuple[str, int] | None]:
    """How to tell whether the Hub can be reached, read from the environment (``os.environ`` by default).

    ("offline", None) when HF_HUB_OFFLINE says so; ("defer", None) when a proxy (HTTPS_PROXY, ALL_PROXY,
    not bypassed by NO_PROXY) carries the traffic, which a raw socket cannot test: the download client
    then decides, and says itself why it failed; else ("socket", (host, port)) of HF_ENDPOINT (a mirror)
    or huggingface.co, to try a connection to.
    """
    env = os.environ if environ is None else environ
    if str(env.get("HF_HUB_OFFLINE", "0")).strip().lower() not in ("0", "", "false", "no", "off"):
        return "offline", None
    url = urllib.parse.urlsplit(str(env.get("HF_ENDPOINT") or _HUB_URL).strip())
    scheme = url.scheme or "https"
    host = url.hostname or _HUB_HOST
    try:
        port = url.port or (80 if scheme == "http" else 443)
    except ValueError:  # a malformed port: let the client report it
        return "defer", None
    # lower-case names win, as in curl and requests
    proxies = {k.lower().removesuffix("_proxy"): v for k, v in sorted(env.items(), key=lambda kv: kv[0].islower())
               if k.lower().endswith("_proxy") and v}
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass_environment(host, proxies):
        return "defer", None
    return "socket", (host, port)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether to try the Hugging Face Hub now (fast: a refused lookup answers at once).

    False offline (HF_HUB_OFFLINE, or no connection to the Hub or its HF_ENDPOINT mirror); True when a
    connection opens, or when a proxy is configured (see :func:`hub_check`): the loader then tries.
    """
    how, address = hub_check()
    if how != "socket" or address is None:
        return how == "defer"
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# loading


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state dict into a timm model, with timm's own key filter for original checkpoints."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"pretrained_file {path} does not exist.")
    if path.suffix != ".safetensors":
        raise WeightsUnavailableError(
            f"{path} is not a .safetensors file; vitviz never unpickles weight files. Convert it on a trusted "
            "machine: python -c \"import torch, safetensors.torch as s; "
            "s.save_file(torch.load('in.pth', weights_only=True), 'out.safetensors')\"."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsUnavailableError(f"cannot read weights file {path}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        # Original (e.g. JAX-converted) checkpoints may need timm's own key filter first.
        filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        try:
            model.load_state_dict(filt(state, model) if filt else state, strict=True)
        except Exception as err:  # a filter meeting foreign keys fails in its own ways
            raise WeightsUnavailableError(
                f"weights in {path} do not fit {type(model).__name__}: {str(err).splitlines()[0]}"
            ) from err


def load_pretrained(model: nn.Module, name: str, *, pretrained_file: str | os.PathLike | None = None,
                    progress: Callable[[str], None] | None = None, **kwargs: Any) -> nn.Module:
    """timm's ``name`` (built with ``kwargs``) carrying pretrained weights.

    From ``pretrained_file`` if given (loaded into ``model``, timm's ``name`` built without weights), else
    from the local Hugging Face cache, else downloaded when the Hub can be reached (``progress`` hears a
    short message first); these two let timm build a new model with its own loader. Otherwise
    WeightsUnavailableError, carrying ``model_name`` and ``hub_id``.
    """
    if pretrained_file is not None:
        load_weights_file(model, pretrained_file)
        return model
    cfg = pretrained_cfg(name)
    repo = _hub_repo(cfg)
    if repo is None and not getattr(cfg, "url", None):
        raise WeightsUnavailableError(
            f"timm has no pretrained weights for {name!r}; pick a name from timm.list_pretrained() or use "
            "pretrained=False for random weights.", model_name=name,
        )
    cached = cached_weights(repo) if repo is not None else None
    if cached is not None:
        return _from_cache(name, cached, repo, **kwargs)
    advice = weights_advice(name, "api")
    if not hub_reachable():
        raise WeightsUnavailableError(
            f"pretrained weights for {name!r} are not in the local Hugging Face cache ({hub_cache_dir()}) and "
            f"the Hub ({_HUB_HOST}) cannot be reached. {advice} Or use pretrained=False for random weights.",
            model_name=name, hub_id=repo,
        )
    return _download(name, repo, progress, advice, **kwargs)


def _from_cache(name: str, path: Path, repo: str, **kwargs: Any) -> nn.Module:
    import timm

    try:
        # timm's own loader on the cached file (safetensors, no network): the same key filter and head or
        # channel adaptation as after a download, so a second run builds what the first one did
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except Exception as err:  # a damaged or foreign file: timm's loader fails in its own ways
        raise WeightsUnavailableError(
            f"the cached weights {path} for {name!r} do not load ({str(err).splitlines()[0]}); delete that file "
            f"so that they are downloaded again, or {WHERE['api']}.", model_name=name, hub_id=repo,
        ) from err


def _download(name: str, repo: str | None, progress: Callable[[str], None] | None, advice: str,
              **kwargs: Any) -> nn.Module:
    import timm

    if progress is not None:
        where = f"{_HUB_URL}/{repo}" if repo else "its download URL"
        progress(f"Downloading the weights of {name} from {where} (once; later runs use the cache)…")
    try:
        # the same cache folder we looked in (huggingface_hub fixed its own at import)
        cache = {"cache_dir": hub_cache_dir()} if repo else {}
        return timm.create_model(name, pretrained=True, **cache, **kwargs)
    except Exception as err:  # network, auth or missing-file errors from the hub client
        raise WeightsUnavailableError(
            f"could not fetch pretrained weights for {name!r}: {err}. {advice}", model_name=name, hub_id=repo
        ) from err
