"""Shared page furniture: the sidebar (model and device), the error guard, small display helpers."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard import state
from dashboard import support as ds
from vitviz.errors import VitvizError, WeightsUnavailableError

log = logging.getLogger("vitviz.dashboard")

MODEL_KEY = "vitviz.loaded"  # session_state: the Loaded model of the sidebar, or None
PROBLEM_KEY = "vitviz.model_problem"  # session_state: why the sidebar's model could not be loaded, or None
SOURCES = ("Shipped", "Folder", "timm", "Hugging Face", "CLIP")
SOURCE_HELP = {
    "Shipped": "Checkpoints trained by vitviz and shipped in checkpoints/.",
    "Folder": "Any folder of .safetensors checkpoints written by vitviz.",
    "timm": "Any timm ViT or ResNet by name, with pretrained weights when they can be had.",
    "Hugging Face": "A transformers image model (ViT, DeiT, BEiT, DINOv2, Swin, CLIP, SigLIP) by hub id or folder.",
    "CLIP": "An open_clip CLIP whose classes are prompts you type.",
}
HOSTED_SOURCES = ("Shipped", "timm")  # VITVIZ_HOSTED=1: no server folders, nothing downloaded
DEFAULT_TIMM = "vit_tiny_patch16_224"
DEFAULT_CLIP = "ViT-B-32"


@contextlib.contextmanager
def guard(what: str = "this page") -> Iterator[None]:
    """Show VitvizErrors (and anything unexpected) as ``st.error`` instead of a traceback."""
    try:
        yield
    except VitvizError as err:
        show_problem(err)
    except Exception as err:  # never a traceback in the page; the server log keeps it
        log.exception("unexpected error in %s", what)
        st.error(f"Something went wrong in {what}: {type(err).__name__}: {err}")


def fragment(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``st.fragment`` whose body is guarded: a fragment rerun runs outside the page's own guard."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            with guard(what):
                return fn(*args, **kwargs)
            return None

        return st.fragment(body)

    return decorate


def sidebar() -> state.Loaded | None:
    """Model picker and device selector; returns the loaded model (also kept in session_state).

    A model that cannot be loaded is not an error of the sidebar: its reason is kept and shown in the
    page body by :func:`need_model`, where there is room to say how to fix it.
    """
    loaded, problem = None, None
    with st.sidebar:
        st.markdown("### :material/blur_on: vitviz")
        st.caption("What Vision Transformers learned, next to hybrids and ResNets.")
        devices = state.devices()
        device = st.selectbox("Device", devices, index=devices.index(remembered("device", devices[0], devices)),
                              key="device", format_func=state.device_label, persist_state="session",
                              help="CUDA when a GPU is present; the CPU otherwise.")
        remember("device", device)
        st.markdown("**Model**")
        options = sources()
        source = st.segmented_control(
            "Source", options, default=remembered("model_source", "Shipped", options), key="model_source",
            required=True, persist_state="session", label_visibility="collapsed",
            help=" · ".join(f"**{k}**: {v}" for k, v in SOURCE_HELP.items() if k in options)
            + (" · This public deployment reads no server folders and downloads no weights: timm models come "
               "with random weights." if hosted() else ""))
        if source not in options:  # a session that started before the setting changed
            source = "Shipped"
        remember("model_source", source)
        try:
            pickers = {"timm": _timm_picker, "Hugging Face": _hf_picker, "CLIP": _clip_picker}
            loaded = pickers[source](device) if source in pickers else _checkpoint_picker(source, device)
        except VitvizError as err:
            problem = err
            st.caption(":red[:material/error: This model cannot be loaded; the page says why.]")
        except Exception as err:  # never a traceback: keep the reason for the page body
            log.exception("loading a model failed")
            problem = err
            st.caption(":red[:material/error: This model cannot be loaded; the page says why.]")
        if loaded is not None:
            _model_card(loaded)
    st.session_state[MODEL_KEY] = loaded
    st.session_state[PROBLEM_KEY] = problem
    return loaded


def hosted() -> bool:
    """Whether this is a public deployment (``VITVIZ_HOSTED=1``): no server-folder picker, no model downloads.

    Only the shipped checkpoints and timm architectures with random weights can be picked; nothing
    reads a path the visitor types or fetches weights from the internet.
    """
    return os.environ.get("VITVIZ_HOSTED", "").strip().lower() in ("1", "true", "yes", "on")


def sources() -> tuple[str, ...]:
    """The model sources the sidebar offers: every one, or the hosted deployment's safe few."""
    return HOSTED_SOURCES if hosted() else SOURCES


REMEMBERED = "vitviz.remembered"  # session_state: the sidebar's last choices, by widget key


def remembered(key: str, default: Any, options: Any = None) -> Any:
    """The sidebar's last choice for widget ``key``, as its default on the next page.

    On the first run of another page a persisted widget can still return its default (the
    checkpoint box fell back to the first, shapes, model when Compare opened); passing the last
    choice as the default makes every page open on the model the sidebar showed.
    """
    value = st.session_state.get(REMEMBERED, {}).get(key, default)
    return value if options is None or value in options else default


def remember(key: str, value: Any) -> None:
    st.session_state.setdefault(REMEMBERED, {})[key] = value


def checkpoint_folder() -> Path:
    """The folder the sidebar points at: the user's folder when *Folder* is chosen and valid, else the shipped one."""
    if st.session_state.get("model_source") == "Folder" and not hosted():
        folder = str(st.session_state.get("model_folder") or "").strip()
        if folder and Path(folder).expanduser().is_dir():
            return Path(folder).expanduser()
    return state.shipped_dir()


def current_model() -> state.Loaded | None:
    return st.session_state.get(MODEL_KEY)


def _checkpoint_picker(source: str, device: str) -> state.Loaded | None:
    if source == "Folder" and not hosted():
        folder = st.text_input(
            "Checkpoint folder", key="model_folder", placeholder="~/runs/checkpoints", persist_state="session",
            help="A folder holding vitviz .safetensors checkpoints (not searched recursively).")
        if not folder:
            st.caption("Type a folder path and press Enter.")
            return None
        path = Path(folder).expanduser()
        if not path.is_dir():
            st.error(f"{path} is not a folder.")
            return None
    else:
        path = state.shipped_dir()
    entries = state.list_checkpoints(path)
    usable = [e for e in entries if e.usable]
    bad = [e for e in entries if not e.usable]
    if not entries:
        if source == "Shipped":
            st.info(f"No checkpoints in {path}. Train one with `vitviz train` or pick *Folder* / *timm*.")
        else:
            st.warning(f"No .safetensors files in {path}.")
    choice = None
    if usable:
        # The box shows the file's stem, shortened in the middle to fit the sidebar; the full names and
        # what each model is are in the box's help and the model card below it.
        labels = {e.key: short_label(Path(e.name).stem) for e in usable}
        options = list(labels)
        last = remembered(f"ckpt_{source}", options[0], options)
        key = st.selectbox("Checkpoint", options, index=options.index(last), format_func=labels.get,
                           key=f"ckpt_{source}", persist_state="session",
                           help="\n\n".join(f"**{e.name}**: {e.label.partition(' — ')[2]}" for e in usable))
        remember(f"ckpt_{source}", key)
        choice = next(e for e in usable if e.key == key)
    if bad:
        with st.expander(f"{len(bad)} unusable file{'s' * (len(bad) > 1)}", icon=":material/warning:"):
            for e in bad:
                st.markdown(f"**{e.name}** — unusable: {e.error}")
    if choice is None:
        return None
    return state.load_checkpoint(choice.path, choice.key, device)


SIDEBAR_CHARS = 26  # what a sidebar box shows of a name before it would cut it off


def short_label(name: str, limit: int = SIDEBAR_CHARS) -> str:
    """``name`` as it fits the sidebar: whole when short, else its start and end around an ellipsis."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2 + (limit - 1) % 2
    return f"{name[:head]}…{name[len(name) - (limit - 1 - head):]}"


def _pick_curated() -> None:
    picked = st.session_state.get("timm_pick")
    if picked:
        st.session_state["timm_name"] = picked


def _timm_picker(device: str) -> state.Loaded | None:
    from vitviz.models.pretrained import CURATED

    st.selectbox("Well-known pretrained models", list(CURATED), index=None, key="timm_pick", on_change=_pick_curated,
                 placeholder="pick one, or type any name below", format_func=lambda n: n.split(".")[0],
                 help="\n\n".join(f"**{n}**: {what}" for n, what in CURATED.items()))
    name = st.text_input("timm model name", value=remembered("timm_name", DEFAULT_TIMM), key="timm_name",
                         persist_state="session",
                         help="Any timm model, with its pretrained tag or without (timm's default tag), e.g. "
                              "vit_base_patch16_224.augreg2_in21k_ft_in1k, swin_tiny_patch4_window7_224, "
                              "convnext_tiny, vit_small_patch14_reg4_dinov2.")
    if hosted():  # a public deployment: random weights only, and no server path to type
        st.toggle("Pretrained weights", value=False, key="timm_pretrained_hosted", disabled=True,
                  help="This public deployment downloads no weights: timm models come with random weights.")
        return _timm_random(name, device)
    pretrained = st.toggle("Pretrained weights", value=remembered("timm_pretrained", True), key="timm_pretrained",
                           persist_state="session",
                           help="Off: random weights, to explore the architecture without downloading anything.")
    weights = st.text_input("Weights file (optional)", value=remembered("timm_weights", ""), key="timm_weights",
                            placeholder="model.safetensors",
                            persist_state="session",
                            help="A model.safetensors downloaded from the Hugging Face Hub, for machines offline.")
    for key, value in (("timm_name", name), ("timm_pretrained", pretrained), ("timm_weights", weights)):
        remember(key, value)
    name = name.strip()
    if not name:
        return None
    weights = weights.strip() or None
    if weights and not os.path.isfile(os.path.expanduser(weights)):
        st.error(f"No such weights file: {weights}")
        return None
    return state.load_timm(name, bool(pretrained), os.path.expanduser(weights) if weights else None, device)


def _timm_random(name: str, device: str) -> state.Loaded | None:
    """A timm architecture with random weights; names that make timm read the Hub or a path are refused."""
    from vitviz.errors import ConfigError

    remember("timm_name", name)
    name = name.strip()
    if ":" in name:  # hf-hub:ORG/NAME fetches a config, local-dir:PATH reads the server's disk
        raise ConfigError(f"{name!r} names a model on the Hugging Face Hub or on disk; this public deployment "
                          "opens timm architectures by name only (e.g. vit_small_patch16_224), with random weights.")
    return state.load_timm(name, False, None, device) if name else None


def _hf_picker(device: str) -> state.Loaded | None:
    from vitviz.models.hf import is_dual

    source = st.text_input(
        "Hugging Face model", value=remembered("hf_source", ""), key="hf_source", persist_state="session",
        placeholder="google/vit-base-patch16-224 or a folder",
        help="A hub id (downloaded on first use when online, then read from the local cache) or a local folder "
             "saved with save_pretrained: ViT, DeiT, BEiT, DINOv2, Swin, CLIP or SigLIP.")
    pretrained = st.toggle("Pretrained weights", value=remembered("hf_pretrained", True), key="hf_pretrained",
                           persist_state="session",
                           help="Off: random weights from the model's config, to explore the architecture.")
    remember("hf_source", source)
    remember("hf_pretrained", pretrained)
    source = source.strip()
    if not source:
        st.caption("Type a hub id or a folder path and press Enter.")
        return None
    local = os.path.expanduser(source)
    base = state.load_hf(local if os.path.exists(local) else source, bool(pretrained), device)
    if not is_dual(base.model):
        return base
    return state.with_prompts(base.key, _prompts_field("hf_prompts"), base)


def _clip_picker(device: str) -> state.Loaded | None:
    arch = st.text_input("open_clip model", value=remembered("clip_arch", DEFAULT_CLIP), key="clip_arch",
                         persist_state="session",
                         help="Any name of open_clip.list_models(), e.g. ViT-B-32, ViT-B-16, ViT-L-14.").strip()
    pretrained = st.toggle("Pretrained weights", value=remembered("clip_pretrained", True), key="clip_pretrained",
                           persist_state="session",
                           help="Off: random weights, to explore the architecture without downloading anything.")
    tag = st.text_input("Weights tag", value=remembered("clip_tag", "openai"), key="clip_tag", persist_state="session",
                        disabled=not pretrained,
                        help="open_clip's name for the weights, e.g. openai, laion2b_s34b_b79k.").strip()
    weights = st.text_input("Weights file (optional)", value=remembered("clip_weights", ""), key="clip_weights",
                            persist_state="session",
                            placeholder="open_clip_model.safetensors",
                            help="The weights file from the Hugging Face Hub, for machines offline.").strip()
    for key, value in (("clip_arch", arch), ("clip_pretrained", pretrained), ("clip_tag", tag),
                       ("clip_weights", weights)):
        remember(key, value)
    prompts = _prompts_field("clip_prompts")
    if not arch:
        return None
    if weights and not os.path.isfile(os.path.expanduser(weights)):
        st.error(f"No such weights file: {weights}")
        return None
    base = state.load_clip(arch, (tag or None) if pretrained and not weights else None,
                           os.path.expanduser(weights) if pretrained and weights else None, device)
    return state.with_prompts(base.key, prompts, base)


def _prompts_field(key: str) -> tuple[str, ...]:
    """The sidebar's prompts, one class per line; a ConfigError (shown in the page) names the field."""
    from vitviz.models.clip import DEFAULT_PROMPTS, check_prompts

    text = st.text_area("Prompts, one class per line", value=remembered(key, "\n".join(DEFAULT_PROMPTS)), key=key,
                        persist_state="session", height=110,
                        help="Each line is a class: the model scores the image against every prompt, and the "
                             "maps show where each prompt is seen.")
    remember(key, text)
    lines = [line for line in text.splitlines() if line.strip()]
    return tuple(check_prompts(lines, where="Prompts (sidebar)"))


def _model_card(loaded: state.Loaded) -> None:
    info = loaded.info
    n = len(info.class_names)
    what = f"{n} classes" if info.has_head else "features, no classifier"
    lines = [f"**{info.family_label}** · {info.img_size}×{info.img_size} px · {what}"]
    if info.path and len(Path(info.path).stem) > SIDEBAR_CHARS:  # the box shortened it: the full name, wrapped
        lines.insert(0, Path(info.path).name.replace("_", "\\_").replace("*", "\\*"))
    if info.dataset:
        lines.append(f"trained on **{info.dataset}**")
    acc, f1 = ds.metric(info, "accuracy"), ds.metric(info, "macro_f1")
    if acc is not None:
        lines.append(f"test accuracy **{100 * acc:.1f} %**" + (f" · macro-F1 {100 * f1:.1f} %" if f1 is not None
                                                                else ""))
    st.caption("  \n".join(lines))


def need_model(loaded: state.Loaded | None) -> state.Loaded:
    """Stop the page with a friendly note (or the reason the model failed to load) when there is no model."""
    if loaded is None:
        problem = st.session_state.get(PROBLEM_KEY)
        if problem is not None:
            show_problem(problem)
        else:
            st.info("Pick a model in the sidebar to start.", icon=":material/arrow_back:")
        st.stop()
    return loaded


def show_problem(err: BaseException) -> None:
    """An exception as the user should see it: what went wrong and what to do."""
    if isinstance(err, WeightsUnavailableError):
        name = getattr(err, "model_name", None)
        advice = str(err)
        with contextlib.suppress(VitvizError):  # an odd name: keep the error's own advice
            advice = _dashboard_advice(name) or advice
        st.warning(f"**Pretrained weights for {name or 'this model'} are not on this machine, and the Hugging Face "
                   f"Hub cannot be reached.** {advice}", icon=":material/cloud_off:")
        if _random_weights_work(name):
            st.info("Or switch *Pretrained weights* off in the sidebar to explore the architecture with random "
                    "weights.")
    elif isinstance(err, VitvizError):
        st.error(str(err))
    else:
        st.error(f"Something went wrong: {type(err).__name__}: {err}")


def _random_weights_work(name: str | None) -> bool:
    """Whether random weights build offline: not for a Hub id whose config.json (its architecture) is not cached."""
    if not name or not name.startswith("hf:"):
        return True
    from vitviz.models.hf import config_cached

    return config_cached(name.removeprefix("hf:"))


def _dashboard_advice(name: str | None) -> str | None:
    """How to supply ``name``'s weights offline, in the sidebar's words."""
    if not name:
        return None
    if name.startswith("hf:"):
        from vitviz.models.hf import hf_advice

        return hf_advice(name.removeprefix("hf:"), "dashboard")
    if name.startswith("open_clip:"):
        from vitviz.models.clip import open_clip_advice

        tag = str(st.session_state.get("clip_tag") or "")
        return open_clip_advice(name.removeprefix("open_clip:"), tag, "dashboard")
    from vitviz.models.pretrained import weights_advice

    return weights_advice(name, "dashboard")


def family_badge(info: ds.ModelInfo) -> str:
    """The family as a badge in its colour, the one every chart gives it (vitviz/plots/colours.py)."""
    from vitviz.plots.colours import family_badge_colour

    colour = family_badge_colour(info.family)
    return f":{colour}-badge[{info.family_label}]"


# What each bundled dataset is, in words a newcomer understands (for the out-of-distribution warnings).
TRAINED_ON = {
    "shapes": "vitviz's synthetic scenes of one flat shape on a striped, coloured background",
    "digits": "scikit-learn's small grayscale handwritten digits",
}


def trained_on(info: ds.ModelInfo) -> str:
    dataset = str(info.dataset or "")
    return TRAINED_ON.get(dataset.lower(), f"the {dataset} dataset" if dataset else "its training data")


def unlike_training(subject: state.Subject) -> bool:
    """Whether ``vitviz.ood_score`` calls the subject's image out of distribution (False without a calibration)."""
    result = state.ood(*subject.key, subject)
    return result is not None and result[0] > result[1]


def ood_warning(subject: state.Subject) -> None:
    """An ``st.warning`` when the image is unlike the model's training data: what it knows, and what to use instead."""
    if not unlike_training(subject):
        return
    info = subject.info
    names = ", ".join(info.class_names)
    st.warning(
        f"**This image is unlike anything this model was trained on.** It knows only {len(info.class_names)} "
        f"classes ({names}), learnt from {trained_on(info)}, and answers with one of them whatever it is shown, "
        "often confidently: the prediction and the maps are a forced choice, not a recognition. For photos, pick "
        "a pretrained model in the sidebar (*timm*, e.g. vit_base_patch16_224).", icon=":material/report:")


def ood_caveat(models: list[state.Loaded], picture: state.Picture, what: str) -> None:
    """The same warning for several models at once (Compare's trust scores)."""
    odd = [m for m in models if unlike_training(state.Subject(m, picture))]
    if not odd:
        return
    names = ", ".join(ds.short_name(m.info) for m in odd)
    data = sorted({trained_on(m.info) for m in odd})
    st.warning(
        f"**{picture.name} is unlike what {names} {'was' if len(odd) == 1 else 'were'} trained on** "
        f"({'; '.join(data)}). {what} then measure how each map follows a forced guess among classes that are not "
        "in the image: they say little about which explanation to trust. Score the bundled images instead, or "
        "explore photos with a pretrained model (*timm* in the sidebar).", icon=":material/report:")
