"""Representations: do Vision Transformers see like CNNs? CKA grids, probes, logit lens, embedding map, errors.

Every section is a fragment (``ui.fragment``) with its own cached computation: changing the compared
model or the features reruns only the CKA section, changing the embedding's layer only the embedding
map, and neither recomputes the probes, the logit lens or another section's results. Only the number
of test images, which every section uses, reruns the page. Each computation shows what it computes
(a progress bar, or a spinner naming it) while it runs; cached results come back at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from dashboard import state, ui
from dashboard import support as ds

DATASETS = ("shapes", "digits")  # the datasets vitviz makes without a download


def subject(loaded: state.Loaded) -> Any:
    from vitviz.represent.subjects import Subject

    info = loaded.info
    return Subject(name=ds.short_name(info), model=loaded.model, img_size=info.img_size, mean=tuple(info.mean),
                   std=tuple(info.std), class_names=list(info.class_names), family=info.family, dataset=info.dataset)


@st.cache_resource(show_spinner="Making the test images…", max_entries=4)
def test_split(dataset: str, size: int) -> Any:
    from vitviz.data import load_dataset

    return load_dataset(dataset, img_size=size)


class _Bar:
    """A Streamlit progress bar as a ``(done, total)`` callback."""

    def __init__(self, text: str) -> None:
        self.text, self.bar = text, st.progress(0.0, text=text)

    def __call__(self, done: int, total: int | None) -> None:
        if total:
            self.bar.progress(min(1.0, done / total), text=f"{self.text} ({done}/{total} batches)")
        else:  # an iterable of unknown length: count the batches
            self.bar.progress(0.0, text=f"{self.text} ({done} batches)")

    def done(self) -> None:
        self.bar.empty()


@st.cache_resource(show_spinner=False)
def _grids() -> dict[tuple, dict]:
    """Computed CKA grids, shared by the sessions (st.cache_data cannot hold a progress bar's updates)."""
    return {}


def cka_grid(key_a: str, key_b: str, dataset: str, n: int, rep: str, a: Any, b: Any) -> dict:
    """The grid of two models over the first ``n`` test images, computed once with a progress bar."""
    from vitviz.represent.matrix import cka_matrix

    store, key = _grids(), (key_a, key_b, dataset, n, rep)
    if key not in store:
        split = test_split(dataset, max(a.img_size, b.img_size))
        bar = _Bar(f"CKA of {a.name} vs {b.name} ({rep} features) over {n} test images")
        store[key] = cka_matrix(a, b, split.test.images[:n], rep=rep, batch_size=64, progress=bar).to_dict()
        bar.done()
        while len(store) > 64:  # bounded: the oldest grid goes first
            store.pop(next(iter(store)))
    return store[key]


@st.cache_data(show_spinner="Fitting the linear probes and the logit lens of a model…", max_entries=32)
def curves(key: str, dataset: str, n: int, _s: Any) -> dict:
    """Probe (train: up to 1,000 training images) and logit-lens curves of one model."""
    from vitviz.errors import VitvizError
    from vitviz.represent.features import collect_readouts
    from vitviz.represent.lens import logit_lens
    from vitviz.represent.probes import probe_layers
    from vitviz.represent.subjects import prepare

    split = test_split(dataset, _s.img_size)

    def read(images: Any, lens: bool) -> Any:
        return collect_readouts(_s.model, (prepare(_s, images[i:i + 128]) for i in range(0, len(images), 128)),
                                lens=lens)

    test, train = read(split.test.images[:n], True), read(split.train.images[:1000], False)
    probe = probe_layers(train.features, split.train.labels[:1000], test.features, split.test.labels[:n],
                         labels=test.labels, name=_s.name).to_dict()
    try:
        lens = logit_lens(test, split.test.labels[:n], name=_s.name).to_dict()
    except VitvizError:
        lens = None
    return {"probe": probe, "lens": lens, "features": [f.numpy() for f in test.features],
            "pred": test.pred.numpy()}


@st.cache_data(show_spinner="Placing the images on the map…", max_entries=32)
def embedding(key: str, dataset: str, n: int, layer: int, method: str, _features: np.ndarray) -> np.ndarray:
    from vitviz.represent.embedding import embed_2d

    return embed_2d(_features[:n], method)


@st.cache_data(show_spinner="Explaining a test image (each model its own prediction)…", max_entries=128)
def explained(key: str, dataset: str, index: int, _s: Any) -> tuple[np.ndarray, np.ndarray, int, str]:
    """An image of the test split, its saliency map from ``_s`` (its own prediction) and the method used."""
    from vitviz.explain import explain_details
    from vitviz.represent.gallery import default_method
    from vitviz.represent.subjects import prepare

    split = test_split(dataset, _s.img_size)
    image = split.test.images[index:index + 1]
    method = default_method(_s)
    res = explain_details(_s.model, prepare(_s, image), method)
    return (image[0].permute(1, 2, 0).numpy(), res.maps[0].cpu().numpy(), int(res.logits[0].argmax()), method)


def model_curves(m: state.Loaded, dataset: str, n: int) -> dict:
    """The probe and lens curves, readout features and predictions of ``m`` (cached: computed once)."""
    return curves(m.key, dataset, n, subject(m))


@ui.fragment("the CKA grid")
def cka_section(a: state.Loaded, models: list[state.Loaded], dataset: str, n: int) -> None:
    from vitviz.represent.figures import cka_figure
    from vitviz.represent.matrix import CKAResult

    st.subheader("Layer-by-layer similarity (CKA)", divider="gray")
    names = {f"{ds.short_name(m.info)}" if k == 0 or ds.short_name(m.info) not in
             [ds.short_name(o.info) for o in models[:k]] else f"{ds.short_name(m.info)} ({k})": m
             for k, m in enumerate(models)}  # option labels are the values: unique names
    c1, c2 = st.columns([1, 3], gap="large")
    with c1:
        others = list(names)
        default = next((k for k, m in names.items() if m.info.family != a.info.family), others[0])
        chosen = st.selectbox("Compare with", others, index=others.index(default), key="rep_other")
        rep = st.radio("Features", ("flat", "readout", "mean"), key="rep_rep", horizontal=True,
                       help="flat: every token (or map cell) flattened, as Raghu et al.; readout: the class token "
                            "(or the mean over cells); mean: the mean over cells.")
        st.caption("Linear CKA (Kornblith et al. 2019) with the unbiased minibatch estimator (Nguyen et al. 2021): "
                   "1 means two layers represent the images alike up to a rotation and scale.")
    b = names[chosen]
    grid = cka_grid(a.key, b.key, dataset, n, rep, subject(a), subject(b))
    res = CKAResult(grid=np.asarray(grid["grid"]), name_a=grid["a"], name_b=grid["b"], labels_a=grid["labels_a"],
                    labels_b=grid["labels_b"], rep=rep, examples=grid["examples"], batches=grid["batches"])
    with c2:
        st.plotly_chart(cka_figure(res), key="rep_cka")


@ui.fragment("the probe and logit-lens curves")
def curves_section(models: list[state.Loaded], dataset: str, n: int) -> None:
    from vitviz.represent.figures import Curve, curves_figure, lens_figure

    st.subheader("How the class becomes readable with depth", divider="gray")
    out = {}
    bar = st.progress(0.0, text="Linear probes and logit lens")
    for k, m in enumerate(models):
        bar.progress(k / len(models), text=f"Linear probes and logit lens of {ds.short_name(m.info)} "
                                           f"({k + 1}/{len(models)} models)")
        out[m.key] = model_curves(m, dataset, n)
    bar.empty()
    c1, c2 = st.columns(2, gap="large")
    with c1:
        fig = curves_figure([Curve(ds.short_name(m.info), out[m.key]["probe"]["test_accuracy"],
                                   labels=out[m.key]["probe"]["labels"]) for m in models],
                            "Linear probe test accuracy by depth")
        st.plotly_chart(fig, key="rep_probes")
        st.caption("A logistic regression on each layer's readout (training images), scored on the test images.")
    with c2:
        lens = [{**out[m.key]["lens"], "model": ds.short_name(m.info)} for m in models if out[m.key]["lens"]]
        if lens:
            st.plotly_chart(lens_figure(lens, "Logit lens: agreement with the final prediction and accuracy"),
                            key="rep_lens")
            st.caption("Each transformer layer's readout through the final norm and head: solid, how often its "
                       "top class is the model's final prediction; dashed, how often it is the true class. Layers "
                       "sit at their depth among all of the model's layers, as in the probe plot; CNNs have no lens.")
        else:
            st.info("No transformer with a head here: the logit lens needs one.")


@ui.fragment("the embedding map")
def embedding_section(a: state.Loaded, dataset: str, n: int) -> None:
    from vitviz.represent.embedding import umap_available
    from vitviz.represent.figures import embedding_figure

    st.subheader("Embedding map", divider="gray")
    data = model_curves(a, dataset, n)
    layers = data["probe"]["labels"]
    c1, c2 = st.columns([1, 3], gap="large")
    with c1:
        label = st.selectbox("Layer", layers, index=len(layers) - 1, key="rep_layer")
        layer = layers.index(label)
        methods = ["tsne", "umap"] if umap_available() else ["tsne"]
        method = st.radio("Method", methods, key="rep_embed", horizontal=True)
        m = st.slider("Images", 50, n, min(300, n), 50, key="rep_embed_n")
    coords = embedding(a.key, dataset, m, layer, method, data["features"][layer])
    split = test_split(dataset, a.info.img_size)
    labels = split.test.labels[:m].numpy()
    with c2:
        fig = embedding_figure(coords, labels, list(a.info.class_names), [f"test #{i}" for i in range(m)],
                               title=f"{method} of {ds.short_name(a.info)} at {layers[layer]}")
        event = st.plotly_chart(fig, key="rep_map", on_select="rerun", selection_mode="points")
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else \
        getattr(getattr(event, "selection", None), "points", [])
    if points:
        index = int(points[0].get("customdata", points[0].get("point_index", 0)))
        if isinstance(points[0].get("customdata"), list):
            index = int(points[0]["customdata"][0])
        with st.container(key="rep_picked"):  # the clicked image: its own container, apart from the gallery's
            show_image(a, dataset, index)
    else:
        st.caption("Hover a point to see which test image it is; click it to see the image and its explanation.")


def fit(saliency: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The map at the image's size (models of one dataset may take other sizes)."""
    return saliency if saliency.shape == image.shape[:2] else ds.nearest_resize(saliency, image.shape[:2])


def show_image(a: state.Loaded, dataset: str, index: int) -> None:
    image, saliency, pred, method = explained(a.key, dataset, index, subject(a))
    names = a.info.class_names
    split = test_split(dataset, a.info.img_size)
    true = int(split.test.labels[index])
    c1, c2 = st.columns(2)
    scale = ds.display_scale(image.shape[0], 224)
    with c1:
        st.image(ds.nearest_resize(image, (image.shape[0] * scale, image.shape[1] * scale)),
                 caption=f"test #{index}: {names[true]}")
    with c2:
        st.image(ds.overlay_png_bytes(image, fit(saliency, image), 0.5, "jet"),
                 caption=f"{method}: predicts {names[pred] if pred < len(names) else pred}")


@ui.fragment("the error gallery")
def gallery_section(a: state.Loaded, models: list[state.Loaded], dataset: str, n: int) -> None:
    st.subheader("Error gallery", divider="gray")
    data = model_curves(a, dataset, n)
    split = test_split(dataset, a.info.img_size)
    wrong = np.flatnonzero(data["pred"] != split.test.labels[:n].numpy())
    if len(wrong) == 0:
        st.success(f"{ds.short_name(a.info)} gets all {n} test images right: no errors to show.")
        return
    limit = st.slider("Errors shown", 1, min(12, len(wrong)), min(4, len(wrong)), key="rep_gallery_n")
    st.caption(f"{ds.short_name(a.info)} misclassifies {len(wrong)} of {n} test images. Each row: one of them, "
               "explained by every model (each explains its own prediction).")
    names = a.info.class_names
    for index in wrong[:limit]:
        cols = st.columns(len(models) + 1)
        image = split.test.images[int(index)].permute(1, 2, 0).numpy()
        scale = ds.display_scale(image.shape[0], 128)
        cols[0].image(ds.nearest_resize(image, (image.shape[0] * scale, image.shape[1] * scale)),
                      caption=f"test #{index}: {names[int(split.test.labels[index])]}")
        for col, m in zip(cols[1:], models, strict=True):
            _, saliency, pred, method = explained(m.key, dataset, int(index), subject(m))
            label = m.info.class_names[pred] if pred < len(m.info.class_names) else str(pred)
            col.image(ds.overlay_png_bytes(image, fit(saliency, image), 0.5, "jet"),
                      caption=f"{ds.short_name(m.info)} ({method}): {label}")


ui.sidebar()
st.title("Representations")
st.caption("Do Vision Transformers see like CNNs? Compare what the families represent layer by layer, as Raghu "
           "et al. (NeurIPS 2021) did: similarity of layers (CKA), how linearly readable the class is with depth, "
           "and the images each model gets wrong.")
with ui.guard("the Representations page"):
    current = ui.need_model(ui.current_model())
    dataset = str(current.info.dataset or "")
    if dataset not in DATASETS:
        st.info("This page compares checkpoints on the datasets vitviz makes itself (shapes, digits): pick one of "
                "the shipped checkpoints, or a checkpoint trained on them, in the sidebar.")
        st.stop()
    folder = ui.checkpoint_folder()
    entries = [e for e in state.list_checkpoints(folder) if e.usable and str(e.meta.dataset) == dataset]
    device = st.session_state.get("device", "cpu")
    models = [state.load_checkpoint(e.path, e.key, device) for e in entries]
    if current.key not in [m.key for m in models]:
        models = [current, *models]
    split = test_split(dataset, current.info.img_size)
    n = st.select_slider("Test images", [64, 128, 256, 512, 1000, 2000], value=256, key="rep_n",
                         help="More images give steadier numbers and take longer; results are cached.")
    n = min(n, len(split.test))
    cka_section(current, models, dataset, n)
    curves_section(models, dataset, n)
    embedding_section(current, dataset, n)
    gallery_section(current, models, dataset, n)
