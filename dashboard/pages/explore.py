"""Explore: one image, one model — what it predicts, and where it looks when it does."""

from __future__ import annotations

import streamlit as st

from dashboard import state, trust_panel, ui
from dashboard import support as ds
from dashboard.widgets import explanation_controls, head_label, layer_slider, patch_picker_figure, picked_patch
from vitviz.errors import InvalidImageError

IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]
UPLOAD_KEY = "vitviz.upload"  # session_state: the last decoded upload, kept while other pages are open

METHOD_NOTES = {
    "attention": "What one layer's readout (the class token, or for a mean-pooled model the mean of all patch "
                 "tokens) attends to, or one chosen head: where that layer looks, not why the model decided.",
    "rollout": "Attention multiplied through every layer (plus the residual path), tracing how much each patch "
               "flows into what the classifier reads (class token or patch mean). The same for every class.",
    "grad-rollout": "Rollout with each layer's attention weighted by its gradient for the target class: "
                    "class-specific.",
    "chefer": "Relevance of Chefer et al. (2021): attention × gradient, propagated through the layers. "
              "Class-specific, usually the sharpest for ViTs.",
    "gradcam": "Grad-CAM: feature-map channels weighted by how much they raise the target class's score. Made "
               "for CNNs; on a transformer it reads one block's tokens as the feature map, where it is often less "
               "faithful than the attention-based methods (Compare scores each method's faithfulness).",
}


def _forget_upload() -> None:
    # The user changed the uploader (a new file, or removed it): the kept upload is no longer theirs.
    st.session_state.pop(UPLOAD_KEY, None)


def pick_picture(info: ds.ModelInfo) -> state.Picture | None:
    """The uploaded image when there is one (decoded safely), else the chosen bundled sample.

    Streamlit forgets a file uploader's file when its page is left, so the decoded upload is kept in
    session_state and shown again on return, until the user removes it.
    """
    upload = st.file_uploader(
        "Upload an image", type=IMAGE_TYPES, key="upload", on_change=_forget_upload,
        help="PNG, JPEG, WebP, BMP, GIF (first frame) or TIFF. It is decoded safely; odd modes are converted.",
    )
    kept = st.session_state.get(UPLOAD_KEY) if upload is None else None
    if kept is not None:
        c1, c2 = st.columns([3, 1], vertical_alignment="center")
        if c2.button("Remove", key="forget_upload", icon=":material/close:"):
            _forget_upload()
            kept = None
        else:
            c1.caption(f"Showing **{kept.name}**, uploaded earlier.")
    names = ds.sample_names()
    # Follow the model's dataset (a digit for a digits model) until the user picks a sample themselves.
    default = ds.default_sample(info.dataset)
    if st.session_state.get("sample") in (None, st.session_state.get("_sample_auto")):
        st.session_state["sample"] = default
    st.session_state["_sample_auto"] = default
    st.selectbox("…or pick a bundled sample", names, key="sample", disabled=upload is not None or kept is not None,
                 help="Shapes scenes come with the object's true mask; digits and photos ship with scikit-learn.")
    if kept is not None:
        return kept
    if upload is None:
        return state.sample(st.session_state["sample"])
    try:
        picture = state.decode_upload(upload.getvalue(), upload.name)
        st.session_state[UPLOAD_KEY] = picture
        return picture
    except InvalidImageError as err:
        st.error(f"**This file can't be used.** {err}")
        return None


def show_prediction(subject: state.Subject, probs) -> None:
    info, pic = subject.info, subject.picture
    if not info.has_head:
        st.markdown("##### No classifier head")
        st.caption("This model returns features, not classes (a DINOv2 or CLIP image tower, or a model built "
                   "with num_classes=0): it predicts nothing. Its attention, rollout, feature similarity and the "
                   "principal components of its features show what it sees.")
        return
    top = ds.topk(probs, info.class_names, k=min(len(info.class_names), 10) if info.prompts else 5)
    st.markdown("##### Prompt probabilities" if info.prompts else "##### Prediction")
    if info.prompts:
        shown = "" if len(info.class_names) <= len(top) else \
            f" The {len(top)} most likely of your {len(info.class_names)} prompts are shown."
        st.caption("Softmax over the image's similarity to each prompt: CLIP's zero-shot scores. They are "
                   f"relative to the prompts you typed; add a prompt and they all change.{shown}")
    for name, p, _ in top:
        st.progress(min(max(p, 0.0), 1.0), text=f"**{name}** — {100 * p:.1f} %")
    if pic.label is not None and pic.label in info.class_names:
        ok = top[0][0] == pic.label
        verdict = ":green-badge[:material/check: correct]" if ok else ":red-badge[:material/close: wrong]"
        st.markdown(f"True label: **{pic.label}** {verdict}")
    elif pic.label is not None:
        st.caption(f"This sample is a *{pic.label}*, a class this model does not know.")


@ui.fragment("the explanation")
def explanation_section(subject: state.Subject, probs) -> None:
    from vitviz.explain import METHOD_LABELS, methods_for

    methods = methods_for(subject.model)
    key = f"method_{len(methods)}"
    # The default goes in as index=, not through session_state: a selectbox re-created with a value
    # written into session_state shows its default option in the browser while the script uses the
    # written value (the method box read "Raw attention" above Chefer's map).
    default = methods.index("chefer") if "chefer" in methods else 0
    method = st.selectbox("Method", methods, index=default, key=key, format_func=lambda m: METHOD_LABELS.get(m, m))
    kwargs = explanation_controls(subject, method, probs)
    st.caption(METHOD_NOTES.get(method, ""))
    emap = state.explanation(*subject.key, method, ds.params_key(kwargs), subject, kwargs)
    overlay_display(subject, method, ds.params_key(kwargs), emap)
    if subject.info.prompts and "target" in kwargs and st.toggle(
            "A map for every prompt", key="every_prompt",
            help="The same method explaining each prompt's similarity in turn: where each one is seen."):
        prompt_maps(subject, method, kwargs)


def prompt_maps(subject: state.Subject, method: str, kwargs: dict) -> None:
    """One small overlay per prompt (the method's target set to that prompt), three to a row."""
    from vitviz.plots.explain import map_label, overlay_figure

    names = subject.info.class_names
    cols = st.columns(min(3, len(names)))
    for i, name in enumerate(names):
        params = {**kwargs, "target": i}
        emap = state.explanation(*subject.key, method, ds.params_key(params), subject, params)
        fig = overlay_figure(subject.fitted_array, emap, opacity=0.5, point=ds.peak(emap), title=name,
                             label=map_label(method))
        fig.update_layout(height=260)
        with cols[i % len(cols)]:
            st.plotly_chart(fig, key=f"prompt_map_{i}", config={"displayModeBar": False})


@ui.fragment("the overlay")
def overlay_display(subject: state.Subject, method: str, params: str, emap) -> None:
    """The overlay and what only changes its look (opacity, colour map): a rerun of its own, nothing recomputed."""
    from vitviz.plots.explain import map_label, overlay_figure

    info = subject.info
    peak = ds.peak(emap)
    fig_col, side = st.columns([2.2, 1], vertical_alignment="top")
    with side:
        opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="opacity")
        cmap = st.selectbox("Colour map", ds.colour_maps(), key="cmap")
        if subject.mask is not None:
            hit, iou = state.localisation(*subject.key, method, params, emap, subject.mask)
            st.metric("Pointing game", "hit" if hit else "miss", border=True,
                      delta="maximum on the object" if hit else "maximum off the object",
                      delta_color="green" if hit else "red", delta_arrow="off",
                      help="Does the map's maximum (×) fall inside the object's true mask (white outline)?")
            st.metric("Mask IoU", f"{iou:.2f}", border=True,
                      help="Overlap of the most salient pixels (as many as the mask has) with the mask.")
        st.markdown("##### Download")
        stem = ds.download_stem(subject.picture.name, method)
        st.download_button(
            "Overlay (PNG)", key="dl_png", on_click="ignore", file_name=f"{stem}.png", mime="image/png",
            data=lambda: ds.overlay_png_bytes(subject.fitted_array, emap, opacity, cmap, subject.mask, peak),
            icon=":material/image:", width="stretch")
        st.download_button("Map (CSV)", key="dl_csv", on_click="ignore", file_name=f"{stem}.csv", mime="text/csv",
                           data=lambda: ds.map_to_csv(emap), icon=":material/table:", width="stretch")
        st.download_button("Map (NPY)", key="dl_npy", on_click="ignore", file_name=f"{stem}.npy",
                           mime="application/octet-stream", data=lambda: ds.map_to_npy(emap),
                           icon=":material/data_array:", width="stretch")
    with fig_col:
        fig = overlay_figure(subject.fitted_array, emap, opacity=opacity, colorscale=cmap, mask=subject.mask,
                             point=peak, label=map_label(method))
        fig.update_layout(height=430)
        st.plotly_chart(fig, key="overlay", config={"displayModeBar": False})
    what = "its true mask (white outline) and " if subject.mask is not None else ""
    st.caption(f"The {info.img_size}×{info.img_size} square the model sees, with the map on top, "
               f"{what}the map's maximum (×). Red is where the method says the evidence is.")


@ui.fragment("the attention heads")
def heads_section(subject: state.Subject, depth: int, heads: int) -> None:
    from vitviz.plots.explain import heads_figure

    st.subheader("Attention heads", divider="gray")
    layer = layer_slider("Layer", depth, depth, key=f"heads_layer_{depth}",
                         help="Early layers mix local and global heads; late layers attend to what decides the class.")
    maps = state.attention_heads(*subject.key, layer - 1, subject)
    cols = min(heads, 6)
    fig = heads_figure(maps, cols=cols, colorscale="inferno", image=subject.fitted_array)
    fig.update_layout(width=170 * cols + 150)  # square tiles, however many heads (and the colour bar's title)
    st.plotly_chart(fig, key="heads", width="content", config={"displayModeBar": False})
    from vitviz.explain import token_layout

    readout = token_layout(subject.model, subject.info.img_size, subject.info.img_size).readout
    source = "the class token" if readout == "token" else "the mean of the patch tokens (the model pools by mean)"
    st.caption(f"Each of the {heads} heads of layer {layer} looks from {source} at every patch, "
               "each scaled to its own range, so compare where each head looks, not how strongly.")


@ui.fragment("the patch attention")
def patch_section(subject: state.Subject, depth: int, heads: int) -> None:
    from vitviz.explain import token_layout

    st.subheader("Where does a patch attend?", divider="gray")
    grid = tuple(token_layout(subject.model, subject.info.img_size, subject.info.img_size).grid)
    row_key, col_key = picked_patch(grid)
    c1, c2 = st.columns([2, 1], vertical_alignment="top")
    with c2:
        st.markdown("Click a patch on the image, or use the sliders.")
        row = st.slider("Patch row", 0, grid[0] - 1, key=row_key)
        col = st.slider("Patch column", 0, grid[1] - 1, key=col_key)
        layer = layer_slider("Layer", depth, depth, key=f"patch_layer_{depth}")
        head = st.selectbox("Head", ["mean", *range(heads)], key=f"patch_head_{heads}", format_func=head_label)
    kwargs = {"layer": layer - 1, "head": head, "query": (row, col)}
    amap = state.explanation(*subject.key, "attention", ds.params_key(kwargs), subject, kwargs)
    with c1:
        fig = patch_picker_figure(subject, amap, grid, (row, col))
        st.plotly_chart(fig, key="patch_pick", on_select="rerun", selection_mode="points",
                        config={"displayModeBar": False})
    st.caption(f"Attention of patch ({row}, {col}) (boxed) to every patch in layer {layer}. Move through the layers "
               "to see whether it looks at its neighbours or gathers from the whole image; the Embeddings page "
               "measures this distance for every head.")


@ui.fragment("the feature components")
def features_section(subject: state.Subject) -> None:
    st.subheader("What the features group together", divider="gray")
    rgb = state.feature_pca(*subject.key, subject)  # (h, w, 3) in [0, 1]
    c1, c2 = st.columns(2)
    with c1:
        st.image(subject.fitted_array, caption="What the model sees", width="stretch")
    with c2:
        st.image(ds.nearest_resize(rgb, subject.fitted_array.shape[:2]), caption="First three components as RGB",
                 width="stretch", clamp=True)
    st.caption(f"The last layer's features of each of the {rgb.shape[0]}×{rgb.shape[1]} cells, reduced to their "
               "three principal components and shown as red, green and blue: cells the model represents alike "
               "share a colour.")


ui.sidebar()
st.title("Explore")
st.caption("Upload an image or pick a sample: see what the model predicts, and where it looks when it does.")
with st.expander("New to Vision Transformers? How to read this page", icon=":material/school:"):
    st.markdown(
        "A ViT cuts the image into square **patches** (16×16 pixels in the paper, 4 or 8 here), turns each into "
        "a token and lets every token **attend** to every other one, layer after layer; a special *class token* "
        "gathers what the classifier reads. **Explanation** maps estimate which patches the prediction rests on: "
        "raw attention shows one layer, rollout follows attention through all layers, and gradient-based "
        "methods (gradient rollout, Chefer relevance, Grad-CAM) ask which patches raise the chosen class's "
        "score. **Attention heads** show that heads specialise. **Where does a patch attend?** lets you pick "
        "any patch and see what it looks at. A hybrid's tokens come from a ResNet's feature map; a ResNet has "
        "no attention at all, so only Grad-CAM applies to it.")
loaded = ui.need_model(ui.current_model())
with ui.guard("the Explore page"):
    left, right = st.columns([1, 2.1], gap="large")
    with left:
        st.subheader("Image", divider="gray")
        picture = pick_picture(loaded.info)
    if picture is not None:
        st.session_state[state.PICTURE_KEY] = picture
        subject = state.Subject(loaded, picture)
        probs = state.probabilities(*subject.key, subject)
        with left:
            h, w = picture.image.shape[:2]
            st.image(ds.thumbnail(picture.image, 320), width="stretch")
            st.caption(f"{picture.name} · {w}×{h} px — the model sees the centre square resized to "
                       f"{loaded.info.img_size}×{loaded.info.img_size}.")
            show_prediction(subject, probs)
            ui.ood_warning(subject)
        with right:
            st.subheader("Explanation", divider="gray")
            explanation_section(subject, probs)
            trust_panel.explore_panel(subject)  # which map to trust here (on request)
        dims = ds.transformer_dims(loaded.model)
        if dims is None and not loaded.info.has_attention:
            st.info("This model has no attention we can record (a CNN), so Grad-CAM and feature similarity apply. "
                    "Pick a ViT or hybrid in the sidebar to see attention heads and patch-to-patch attention.")
        elif dims is not None:
            heads_section(subject, *dims)
            patch_section(subject, *dims)
        features_section(subject)
