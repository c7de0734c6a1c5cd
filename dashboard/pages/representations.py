"""Representations: do Vision Transformers see like CNNs? CKA grids, probes, logit lens, embedding map, errors.

The sidebar's model is compared with the checkpoints trained on one of the datasets vitviz makes
itself (shapes, digits) on that dataset's test images: a checkpoint's own dataset, or, for any other
model (timm, Hugging Face, open_clip, a checkpoint of another dataset), the dataset picked under
*Images*. Every model is fed the same images at its own input size, mean and std
(:func:`vitviz.represent.subjects.prepare`). What needs the dataset's classes (the logit lens'
accuracy, the error gallery) is shown only for models that predict them; the rest (CKA, probes on the
dataset's labels, the lens' agreement with the model's own prediction, the embedding map) works for
every model the adapters cover.

Every section is a fragment (``ui.fragment``) with its own cached computation: changing the compared
model or the features reruns only the CKA section, changing the embedding's layer only the embedding
map, and neither recomputes the probes, the logit lens or another section's results. Only the number
of test images and the images' dataset, which every section uses, rerun the page. Each computation
shows what it computes (a progress bar, or a spinner naming it) while it runs; cached results come
back at once. Cache keys name the images' dataset and size, never the sidebar model's dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from dashboard import state, ui
from dashboard import support as ds

DATASETS = ("shapes", "digits")  # the datasets vitviz makes without a download
DEFAULT_SIZE = 32  # the images' side when no checkpoint of the dataset gives one (the shipped shapes models')


def subject(loaded: state.Loaded) -> Any:
    from vitviz.represent.subjects import Subject

    info = loaded.info
    return Subject(name=ds.short_name(info), model=loaded.model, img_size=info.img_size, mean=tuple(info.mean),
                   std=tuple(info.std), class_names=list(info.class_names), family=info.family, dataset=info.dataset)


@st.cache_resource(show_spinner="Making the test images…", max_entries=4)
def test_split(dataset: str, size: int) -> Any:
    from vitviz.data import load_dataset

    return load_dataset(dataset, img_size=size)


@dataclass(frozen=True)
class Images:
    """The test images every section uses: ``dataset``, made at ``size`` px for models not trained on it."""

    dataset: str
    size: int
    class_names: tuple[str, ...]

    def size_for(self, m: state.Loaded) -> int:
        """A model trained on the dataset gets it at its own size, as in training; any other model gets
        ``size`` px images, which :func:`~vitviz.represent.subjects.prepare` resizes to its input."""
        return m.info.img_size if m.info.dataset == self.dataset else self.size

    def split(self, m: state.Loaded) -> Any:
        return test_split(self.dataset, self.size_for(m))

    def knows(self, m: state.Loaded) -> bool:
        """Whether ``m`` predicts the dataset's classes (its lens accuracy and its errors mean something)."""
        from vitviz.represent.subjects import same_classes

        return same_classes(subject(m), self.dataset, self.class_names)

    def why_not(self, m: state.Loaded) -> str:
        """Why ``m``'s predictions cannot be scored against the dataset's labels, in a few words."""
        if not m.info.has_head:
            return f"{ds.short_name(m.info)} has no classifier head (it returns features)"
        k = len(m.info.class_names)
        return f"{ds.short_name(m.info)} predicts {k} classes of its own, not the {self.dataset} classes"


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


def cka_grid(key_a: str, key_b: str, dataset: str, size: int, n: int, rep: str, a: Any, b: Any) -> dict:
    """The grid of two models over the first ``n`` test images (made at ``size`` px), computed once with a
    progress bar; each model resizes and normalises the images as it was trained."""
    from vitviz.represent.matrix import cka_matrix

    store, key = _grids(), (key_a, key_b, dataset, size, n, rep)
    if key not in store:
        split = test_split(dataset, size)
        bar = _Bar(f"CKA of {a.name} vs {b.name} ({rep} features) over {n} test images")
        store[key] = cka_matrix(a, b, split.test.images[:n], rep=rep, batch_size=64, progress=bar).to_dict()
        bar.done()
        while len(store) > 64:  # bounded: the oldest grid goes first
            store.pop(next(iter(store)))
    return store[key]


@st.cache_data(show_spinner="Fitting the linear probes and the logit lens of a model…", max_entries=32)
def curves(key: str, dataset: str, size: int, n: int, scored: bool, _s: Any) -> dict:
    """Probe (train: up to 1,000 training images) and logit-lens curves of one model on ``dataset`` made at
    ``size`` px; ``scored``: the model predicts the dataset's classes, so the lens gets an accuracy too."""
    from vitviz.errors import VitvizError
    from vitviz.represent.features import collect_readouts
    from vitviz.represent.lens import logit_lens
    from vitviz.represent.probes import probe_layers
    from vitviz.represent.subjects import prepare

    split = test_split(dataset, size)

    def read(images: Any, lens: bool) -> Any:
        return collect_readouts(_s.model, (prepare(_s, images[i:i + 128]) for i in range(0, len(images), 128)),
                                lens=lens)

    test, train = read(split.test.images[:n], True), read(split.train.images[:1000], False)
    probe = probe_layers(train.features, split.train.labels[:1000], test.features, split.test.labels[:n],
                         labels=test.labels, name=_s.name).to_dict()
    try:
        lens = logit_lens(test, split.test.labels[:n] if scored else None, name=_s.name).to_dict()
    except VitvizError:  # a CNN, a headless model, or a head that does not read the blocks directly
        lens = None
    return {"probe": probe, "lens": lens, "features": [f.numpy() for f in test.features],
            "pred": test.pred.numpy()}


@st.cache_data(show_spinner="Placing the images on the map…", max_entries=32)
def embedding(key: str, dataset: str, size: int, n: int, layer: int, method: str,
              _features: np.ndarray) -> np.ndarray:
    from vitviz.represent.embedding import embed_2d

    return embed_2d(_features[:n], method)


@st.cache_data(show_spinner="Explaining a test image (each model its own prediction)…", max_entries=128)
def explained(key: str, dataset: str, size: int, index: int, _s: Any) -> tuple[np.ndarray, np.ndarray, int, str]:
    """An image of the test split, its saliency map from ``_s`` (its own prediction) and the method used."""
    from vitviz.explain import explain_details
    from vitviz.represent.gallery import default_method
    from vitviz.represent.subjects import prepare

    split = test_split(dataset, size)
    image = split.test.images[index:index + 1]
    method = default_method(_s)
    res = explain_details(_s.model, prepare(_s, image), method)
    return (image[0].permute(1, 2, 0).numpy(), res.maps[0].cpu().numpy(), int(res.logits[0].argmax()), method)


def model_curves(m: state.Loaded, images: Images, n: int) -> dict:
    """The probe and lens curves, readout features and predictions of ``m`` (cached: computed once)."""
    return curves(m.key, images.dataset, images.size_for(m), n, images.knows(m), subject(m))


@ui.fragment("the CKA grid")
def cka_section(a: state.Loaded, models: list[state.Loaded], images: Images, n: int) -> None:
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
    size = max(images.size_for(a), images.size_for(b))  # both models resize these images to their own input
    grid = cka_grid(a.key, b.key, images.dataset, size, n, rep, subject(a), subject(b))
    res = CKAResult(grid=np.asarray(grid["grid"]), name_a=grid["a"], name_b=grid["b"], labels_a=grid["labels_a"],
                    labels_b=grid["labels_b"], rep=rep, examples=grid["examples"], batches=grid["batches"])
    with c2:
        st.plotly_chart(cka_figure(res), key="rep_cka")


@ui.fragment("the probe and logit-lens curves")
def curves_section(models: list[state.Loaded], images: Images, n: int) -> None:
    from vitviz.represent.figures import Curve, curves_figure, lens_figure

    st.subheader("How the class becomes readable with depth", divider="gray")
    out = {}
    bar = st.progress(0.0, text="Linear probes and logit lens")
    for k, m in enumerate(models):
        bar.progress(k / len(models), text=f"Linear probes and logit lens of {ds.short_name(m.info)} "
                                           f"({k + 1}/{len(models)} models)")
        out[m.key] = model_curves(m, images, n)
    bar.empty()
    c1, c2 = st.columns(2, gap="large")
    with c1:
        fig = curves_figure([Curve(ds.short_name(m.info), out[m.key]["probe"]["test_accuracy"],
                                   labels=out[m.key]["probe"]["labels"]) for m in models],
                            "Linear probe test accuracy by depth")
        st.plotly_chart(fig, key="rep_probes")
        st.caption(f"A logistic regression on each layer's readout of {images.dataset} training images, fitted "
                   "to the dataset's labels and scored on its test images: it works for any model, whatever "
                   "classes (if any) its own head predicts.")
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
        unscored = [images.why_not(m) for m in models if out[m.key]["lens"] and not images.knows(m)]
        if unscored:
            st.caption(f"Agreement only, no accuracy: {'; '.join(unscored)}, so its lens top class cannot be "
                       "compared with the true class.")
        headless = [ds.short_name(m.info) for m in models if not m.info.has_head]
        if headless:
            st.caption(f"No lens for {', '.join(headless)}: no classifier head (it returns features).")


@ui.fragment("the embedding map")
def embedding_section(a: state.Loaded, images: Images, n: int) -> None:
    from vitviz.represent.embedding import umap_available
    from vitviz.represent.figures import embedding_figure

    st.subheader("Embedding map", divider="gray")
    data = model_curves(a, images, n)
    layers = data["probe"]["labels"]
    c1, c2 = st.columns([1, 3], gap="large")
    with c1:
        label = st.selectbox("Layer", layers, index=len(layers) - 1, key="rep_layer")
        layer = layers.index(label)
        methods = ["tsne", "umap"] if umap_available() else ["tsne"]
        method = st.radio("Method", methods, key="rep_embed", horizontal=True)
        m = st.slider("Images", 50, n, min(300, n), 50, key="rep_embed_n")
    size = images.size_for(a)
    coords = embedding(a.key, images.dataset, size, m, layer, method, data["features"][layer])
    labels = images.split(a).test.labels[:m].numpy()
    with c2:  # coloured by the dataset's classes, whatever the model's own classes are
        fig = embedding_figure(coords, labels, list(images.class_names), [f"test #{i}" for i in range(m)],
                               title=f"{method} of {ds.short_name(a.info)} at {layers[layer]}")
        event = st.plotly_chart(fig, key="rep_map", on_select="rerun", selection_mode="points")
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else \
        getattr(getattr(event, "selection", None), "points", [])
    if points:
        index = int(points[0].get("customdata", points[0].get("point_index", 0)))
        if isinstance(points[0].get("customdata"), list):
            index = int(points[0]["customdata"][0])
        with st.container(key="rep_picked"):  # the clicked image: its own container, apart from the gallery's
            show_image(a, images, index)
    else:
        st.caption("Hover a point to see which test image it is; click it to see the image and its explanation.")


def fit(saliency: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The map at the image's size (models of one dataset may take other sizes)."""
    return saliency if saliency.shape == image.shape[:2] else ds.nearest_resize(saliency, image.shape[:2])


def show_image(a: state.Loaded, images: Images, index: int) -> None:
    split = images.split(a)
    image = split.test.images[index].permute(1, 2, 0).numpy()  # (H, W, 3) uint8
    true = images.class_names[int(split.test.labels[index])]
    c1, c2 = st.columns(2)
    scale = ds.display_scale(image.shape[0], 224)
    with c1:
        st.image(ds.nearest_resize(image, (image.shape[0] * scale, image.shape[1] * scale)),
                 caption=f"test #{index}: {true}")
    if not a.info.has_head:  # nothing to explain: no class score
        c2.caption(f"{ds.short_name(a.info)} has no classifier head: it predicts no class to explain.")
        return
    image, saliency, pred, method = explained(a.key, images.dataset, images.size_for(a), index, subject(a))
    names = a.info.class_names  # the model's own classes: its prediction, in its words
    with c2:
        st.image(ds.overlay_png_bytes(image, fit(saliency, image), 0.5, "jet"),
                 caption=f"{method}: predicts {names[pred] if pred < len(names) else pred}")


@ui.fragment("the error gallery")
def gallery_section(a: state.Loaded, models: list[state.Loaded], images: Images, n: int) -> None:
    st.subheader("Error gallery", divider="gray")
    if not images.knows(a):
        st.info(f"No error gallery: it shows the test images a model gets wrong, and {images.why_not(a)}.")
        return
    data = model_curves(a, images, n)
    split = images.split(a)
    wrong = np.flatnonzero(data["pred"] != split.test.labels[:n].numpy())
    if len(wrong) == 0:
        st.success(f"{ds.short_name(a.info)} gets all {n} test images right: no errors to show.")
        return
    limit = st.slider("Errors shown", 1, min(12, len(wrong)), min(4, len(wrong)), key="rep_gallery_n")
    st.caption(f"{ds.short_name(a.info)} misclassifies {len(wrong)} of {n} test images. Each row: one of them, "
               "explained by every model (each explains its own prediction).")
    names = images.class_names
    for index in wrong[:limit]:
        cols = st.columns(len(models) + 1)
        image = split.test.images[int(index)].permute(1, 2, 0).numpy()
        scale = ds.display_scale(image.shape[0], 128)
        cols[0].image(ds.nearest_resize(image, (image.shape[0] * scale, image.shape[1] * scale)),
                      caption=f"test #{index}: {names[int(split.test.labels[index])]}")
        for col, m in zip(cols[1:], models, strict=True):
            _, saliency, pred, method = explained(m.key, images.dataset, images.size_for(m), int(index), subject(m))
            label = m.info.class_names[pred] if pred < len(m.info.class_names) else str(pred)
            col.image(ds.overlay_png_bytes(image, fit(saliency, image), 0.5, "jet"),
                      caption=f"{ds.short_name(m.info)} ({method}): {label}")


def images_dataset(current: state.Loaded) -> str:
    """The dataset whose test images the page uses: the sidebar model's own, else the one picked here."""
    own = str(current.info.dataset or "")
    if own in DATASETS:
        return own
    dataset = st.radio("Images", DATASETS, key="rep_images", horizontal=True,
                       help="The dataset whose test images every model is compared on (vitviz makes both without "
                            "a download); the models compared are the checkpoints trained on it.")
    st.caption(f"{ds.short_name(current.info)} was not trained on a dataset vitviz makes: it is compared with the "
               f"{dataset} checkpoints on {dataset} test images, each model fed them at its own input size and "
               "normalisation.")
    return dataset


def dataset_models(current: state.Loaded, dataset: str) -> list[state.Loaded]:
    """The sidebar's model first (unless it is one of them), then the checkpoints trained on ``dataset``: those
    of the sidebar's folder, else the shipped ones."""
    device = st.session_state.get("device", "cpu")
    folders = list(dict.fromkeys([Path(ui.checkpoint_folder()), Path(state.shipped_dir())]))
    entries: list[Any] = []
    for folder in folders:
        entries = [e for e in state.list_checkpoints(folder) if e.usable and str(e.meta.dataset) == dataset]
        if entries:
            break
    models = [state.load_checkpoint(e.path, e.key, device) for e in entries]
    if not models:
        st.info(f"No checkpoint trained on {dataset} in {folders[0]}: {ds.short_name(current.info)} is compared "
                f"with itself. Train one with `vitviz train` on {dataset}, or point *Folder* at a folder holding one.")
    return models if current.key in [m.key for m in models] else [current, *models]


ui.sidebar()
st.title("Representations")
st.caption("Do Vision Transformers see like CNNs? Compare what the families represent layer by layer, as Raghu "
           "et al. (NeurIPS 2021) did: similarity of layers (CKA), how linearly readable the class is with depth, "
           "and the images each model gets wrong.")
with ui.guard("the Representations page"):
    current = ui.need_model(ui.current_model())
    dataset = images_dataset(current)
    models = dataset_models(current, dataset)
    base = max((m.info.img_size for m in models if m.info.dataset == dataset), default=DEFAULT_SIZE)
    split = test_split(dataset, base)
    images = Images(dataset, base, tuple(split.class_names))
    n = st.select_slider("Test images", [64, 128, 256, 512, 1000, 2000], value=256, key="rep_n",
                         help="More images give steadier numbers and take longer; results are cached.")
    n = min(n, len(split.test))
    cka_section(current, models, images, n)
    curves_section(models, images, n)
    embedding_section(current, images, n)
    gallery_section(current, models, images, n)
