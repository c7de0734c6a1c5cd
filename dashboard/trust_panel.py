"""The trust panel: which map to trust for this model, measured with the one scorer (vitviz.explain.trust).

Explore scores every applicable method on the current image (on request: it runs each method and a few
dozen forward passes); Compare scores every model's methods on the chosen image or on a sample of the
dataset. Methods whose registry cost is many passes (RISE, occlusion, Score-CAM, ...) join only when
asked. Each table is ranked, shows random maps' score beside every number, and ends in one plain sentence.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard import state, ui
from dashboard import support as ds

COLUMNS = {"deletion AUC ↓": "Deletion AUC ↓", "insertion AUC ↑": "Insertion AUC ↑", "ROAD AUC ↓": "ROAD AUC ↓",
           "pointing game ↑": "Pointing game ↑", "mask IoU ↑": "Mask IoU ↑", "sanity ρ ↓": "Sanity ρ ↓",
           "cost (passes)": "Cost", "ms / image": "ms / image", "rank": "Rank", "method": "Method"}
EXPLAINER = ("**Deletion** removes the units (patches on a transformer) the map ranks highest first: a faithful map "
             "makes the model's confidence collapse fast (low area). **Insertion** adds them back into a blurred "
             "image (high area is good). **ROAD** removes them but fills them in from their neighbours, so the "
             "model is not fooled by holes it never saw in training (low is good). Each cell reads *mean [95 % "
             "interval] vs random maps*; ✓ marks a method that beats random maps.")


def _split(methods: list[str], model: Any, size: int) -> tuple[list[str], list[str]]:
    from vitviz.explain.trust import is_slow

    slow = [m for m in methods if is_slow(m, model, size, size)]
    return [m for m in methods if m not in slow], slow


@st.cache_data(show_spinner=False, max_entries=64)
def report(model_key: str, image_keys: tuple[str, ...], methods: tuple[str, ...], sanity: int,
           _loaded: state.Loaded, _pictures: list[state.Picture]) -> dict:
    """The scorer's report (plus mean curves) for one model on some pictures; cached by model, images, methods."""
    import numpy as np
    import torch

    from vitviz.explain.trust import protocol_for, score_methods, summarise
    from vitviz.images import preprocess

    info = _loaded.info
    x = preprocess([p.pil for p in _pictures], info).to(_loaded.device)  # (B, 3, S, S)
    masks = None
    if all(p.mask is not None for p in _pictures):
        masks = torch.from_numpy(np.stack([ds.fit_mask(p.mask, info.img_size) for p in _pictures]))
        masks = masks.to(_loaded.device)
    protocol = protocol_for(_loaded.model, info.img_size, info.img_size, sanity_images=sanity,
                            sanity_points=3, bootstrap=500)
    rec = score_methods(_loaded.model, x, methods=list(methods), protocol=protocol, masks=masks, batch_size=8)
    out = summarise(rec)
    out["curves"] = {m: {k: v.mean(axis=0).tolist() for k, v in c.items()} for m, c in rec.curves.items()}
    out["fractions"] = {k: v.tolist() for k, v in rec.fractions.items()}
    return out


def _rows(rep: dict, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    from vitviz.explain.trust import table_rows

    return [{**(extra or {}), **{COLUMNS.get(k, k): v for k, v in row.items()}} for row in table_rows(rep)]


def _slow_toggle(slow: list[str], key: str) -> bool:
    """One toggle naming the slow methods (each costs many passes); False when there are none."""
    if not slow:
        return False
    from vitviz.explain import METHOD_LABELS

    names = ", ".join(dict.fromkeys(METHOD_LABELS.get(m, m).split(" (")[0] for m in slow))
    return st.toggle(f"Include the slow methods ({names})", key=key,
                     help="Each costs dozens to thousands of model passes per image (the registry's cost).")


def _methods_choice(model: Any, size: int, methods: list[str], key: str) -> list[str]:
    fast, slow = _split(methods, model, size)
    return fast + slow if _slow_toggle(slow, f"{key}_slow") else fast


def _verdict(rep: dict) -> None:
    text = rep["verdict"]
    (st.success if text.startswith("Trust ") and not text.startswith("Trust none") else st.warning)(
        text, icon=":material/verified:")


@ui.fragment("the trust scores")
def explore_panel(subject: state.Subject) -> None:
    """Explore: every applicable method scored on the current image, ranked, with a verdict (on request)."""
    from vitviz.explain import methods_for

    st.subheader("Which map to trust here?", divider="gray")
    if not subject.info.has_head:
        st.caption("Trust scores follow a class probability: this model has no classifier head.")
        return
    if not st.toggle("Score every method on this image", key="trust_here",
                     help="Deletion, insertion and ROAD for each method against random maps (a few seconds)."):
        st.caption("Measures, for this image, which method's map the prediction actually rests on.")
        return
    methods = _methods_choice(subject.model, subject.info.img_size, methods_for(subject.model, saliency_only=True),
                              "trust_here")
    with st.spinner("Deleting, inserting and imputing patches for every method…"):
        rep = report(subject.loaded.key, (subject.picture.key,), tuple(methods), 0, subject.loaded,
                     [subject.picture])
    _verdict(rep)
    st.dataframe(_rows(rep), hide_index=True, key="trust_here_table", height="content")
    st.caption(EXPLAINER + " One image gives no interval: Compare scores a sample of the dataset. "
               + rep["protocol"]["text"])


def _curves_figure(rep: dict, method: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    colours = {"deletion": "#d62728", "insertion": "#1f77b4", "road": "#2ca02c"}
    for name, dash in ((method, "solid"), ("random", "dash")):
        for curve, colour in colours.items():
            y = rep["curves"].get(name, {}).get(curve)
            if y is None:
                continue
            label = f"{'ROAD' if curve == 'road' else curve}{', random map' if name == 'random' else ''}"
            fig.add_trace(go.Scatter(x=rep["fractions"][curve], y=y, mode="lines", name=label,
                                     line={"color": colour, "dash": dash}))
    fig.update_layout(xaxis_title="fraction of units removed / inserted", yaxis_title="probability of the class",
                      yaxis_range=[0, 1.02], height=320, margin={"t": 20, "l": 10, "r": 10, "b": 10},
                      legend={"orientation": "h", "y": -0.3})
    return fig


@ui.fragment("the trust scores")
def compare_panel(models: list[state.Loaded], picture: state.Picture, dataset: str) -> None:
    """Compare: every model's methods scored on the chosen image or a sample of the dataset, ranked per model."""
    st.subheader("Which explanation can you trust?", divider="gray")
    sets = {"this": "the image above", "set": f"8 bundled {dataset} images" if dataset in ("shapes", "digits")
            else "8 bundled images"}
    c1, c2 = st.columns([1.2, 1])
    with c1:
        which = st.segmented_control("Scored on", list(sets), default="this", key="faith_set", required=True,
                                     format_func=sets.get)
    pictures = [picture] if which == "this" else [state.sample(n) for n in ds.dataset_samples(dataset)[:8]]
    if which == "this":
        ui.ood_caveat(models, picture, "These scores")
    with c2:
        sanity = st.toggle("Add the sanity check", key="trust_sanity", disabled=which == "this",
                           help="Re-draws the model's weights from the head down and measures how much each map "
                                "changes (Adebayo et al. 2018): a map that barely changes does not depend on what "
                                "the model learned. On 4 of the images.")
    scored = [m for m in models if m.info.has_head]
    split = {m.key: _split(state.methods(m, saliency_only=True), m.model, m.info.img_size) for m in scored}
    slow = _slow_toggle([name for _, s in split.values() for name in s], "trust_slow")  # one for every model
    rows, reports = [], {}
    with st.spinner("Deleting, inserting and imputing patches for every method…"):
        for loaded in scored:
            fast, slow_ones = split[loaded.key]
            methods = fast + slow_ones if slow else fast
            rep = report(loaded.key, tuple(p.key for p in pictures), tuple(methods),
                         4 if sanity and which == "set" else 0, loaded, pictures)
            reports[ds.short_name(loaded.info)] = rep
            rows += _rows(rep, {"Model": ds.short_name(loaded.info), "Family": loaded.info.family_label})
    if not rows:
        st.info("None of these models has a classifier head to score maps against.")
        return
    for name, rep in reports.items():
        st.markdown(f"**{name}** — {rep['verdict']}")
    st.dataframe(rows, hide_index=True, key="faith_table", height="content")
    c1, c2 = st.columns([1, 1.4], gap="large")
    keys = [(name, m) for name, rep in reports.items() for m in rep["ranking"]]
    with c1:
        from vitviz.explain import METHOD_LABELS

        pick = st.selectbox("Curves of", keys, key="faith_pick",
                            format_func=lambda k: f"{k[0]} · {METHOD_LABELS.get(k[1], k[1]).split(' (')[0]}")
        st.markdown(EXPLAINER)
        st.caption(next(iter(reports.values()))["protocol"]["text"])
    with c2:
        if pick is not None:
            st.plotly_chart(_curves_figure(reports[pick[0]], pick[1]), key="faith_curves")
