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
from vitviz import dashboard_support as ds
from vitviz.errors import VitvizError, WeightsUnavailableError

log = logging.getLogger("vitviz.dashboard")

MODEL_KEY = "vitviz.loaded"  # session_state: the Loaded model of the sidebar, or None
PROBLEM_KEY = "vitviz.model_problem"  # session_state: why the sidebar's model could not be loaded, or None
SOURCES = ("Shipped", "Folder", "timm")
SOURCE_HELP = {
    "Shipped": "Checkpoints trained by vitviz and shipped in checkpoints/.",
    "Folder": "Any folder of .safetensors checkpoints written by vitviz.",
    "timm": "Any timm ViT or ResNet by name, with pretrained weights when they can be had.",
}
DEFAULT_TIMM = "vit_tiny_patch16_224"


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
        device = st.selectbox("Device", devices, index=0, key="device", format_func=state.device_label,
                              persist_state="session", help="CUDA when a GPU is present; the CPU otherwise.")
        st.markdown("**Model**")
        source = st.segmented_control(
            "Source", SOURCES, default="Shipped", key="model_source", required=True, persist_state="session",
            label_visibility="collapsed", help=" · ".join(f"**{k}**: {v}" for k, v in SOURCE_HELP.items()))
        try:
            loaded = _timm_picker(device) if source == "timm" else _checkpoint_picker(source, device)
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


def checkpoint_folder() -> Path:
    """The folder the sidebar points at: the user's folder when *Folder* is chosen and valid, else the shipped one."""
    if st.session_state.get("model_source") == "Folder":
        folder = str(st.session_state.get("model_folder") or "").strip()
        if folder and Path(folder).expanduser().is_dir():
            return Path(folder).expanduser()
    return state.shipped_dir()


def current_model() -> state.Loaded | None:
    return st.session_state.get(MODEL_KEY)


def _checkpoint_picker(source: str, device: str) -> state.Loaded | None:
    if source == "Folder":
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
        labels = {e.key: e.label for e in usable}
        key = st.selectbox("Checkpoint", list(labels), format_func=labels.get, key=f"ckpt_{source}",
                           persist_state="session")
        choice = next(e for e in usable if e.key == key)
    if bad:
        with st.expander(f"{len(bad)} unusable file{'s' * (len(bad) > 1)}", icon=":material/warning:"):
            for e in bad:
                st.markdown(f"**{e.name}** — unusable: {e.error}")
    if choice is None:
        return None
    return state.load_checkpoint(choice.path, choice.key, device)


def _pick_curated() -> None:
    picked = st.session_state.get("timm_pick")
    if picked:
        st.session_state["timm_name"] = picked


def _timm_picker(device: str) -> state.Loaded | None:
    from vitviz.models.pretrained import CURATED

    st.selectbox("Well-known pretrained models", list(CURATED), index=None, key="timm_pick", on_change=_pick_curated,
                 placeholder="pick one, or type any name below", format_func=lambda n: n.split(".")[0],
                 help="\n\n".join(f"**{n}**: {what}" for n, what in CURATED.items()))
    name = st.text_input("timm model name", value=DEFAULT_TIMM, key="timm_name", persist_state="session",
                         help="Any timm model, with its pretrained tag or without (timm's default tag), e.g. "
                              "vit_base_patch16_224.augreg2_in21k_ft_in1k, swin_tiny_patch4_window7_224, "
                              "convnext_tiny, vit_small_patch14_reg4_dinov2.")
    pretrained = st.toggle("Pretrained weights", value=True, key="timm_pretrained", persist_state="session",
                           help="Off: random weights, to explore the architecture without downloading anything.")
    weights = st.text_input("Weights file (optional)", key="timm_weights", placeholder="model.safetensors",
                            persist_state="session",
                            help="A model.safetensors downloaded from the Hugging Face Hub, for machines offline.")
    name = name.strip()
    if not name:
        return None
    weights = weights.strip() or None
    if weights and not os.path.isfile(os.path.expanduser(weights)):
        st.error(f"No such weights file: {weights}")
        return None
    return state.load_timm(name, bool(pretrained), os.path.expanduser(weights) if weights else None, device)


def _model_card(loaded: state.Loaded) -> None:
    info = loaded.info
    n = len(info.class_names)
    what = f"{n} classes" if info.has_head else "features, no classifier"
    lines = [f"**{info.family_label}** · {info.img_size}×{info.img_size} px · {what}"]
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
        if name:
            from vitviz.models.pretrained import weights_advice

            with contextlib.suppress(VitvizError):  # an odd name: keep the error's own advice
                advice = weights_advice(name, "dashboard")
        st.warning(f"**Pretrained weights for {name or 'this model'} are not on this machine, and the Hugging Face "
                   f"Hub cannot be reached.** {advice}", icon=":material/cloud_off:")
        st.info("Or switch *Pretrained weights* off in the sidebar to explore the architecture with random weights.")
    elif isinstance(err, VitvizError):
        st.error(str(err))
    else:
        st.error(f"Something went wrong: {type(err).__name__}: {err}")


def family_badge(info: ds.ModelInfo) -> str:
    colour = {"vit": "blue", "hybrid": "violet", "resnet": "orange"}.get(info.family, "gray")
    return f":{colour}-badge[{info.family_label}]"
