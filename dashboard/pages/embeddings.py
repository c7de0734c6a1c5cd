"""Embeddings: what a ViT learned before it sees an image (the ViT paper's Figure 7)."""

from __future__ import annotations

import streamlit as st

from dashboard import state, ui
from dashboard import support as ds
from dashboard.captions import attention_distance_caption, position_similarity_caption


@ui.fragment("the patch filters")
def filters_section(loaded: state.Loaded) -> None:
    from vitviz.explain import adapter_for
    from vitviz.plots.explain import filters_figure, pca_figure

    st.subheader("Patch-embedding filters", divider="gray")
    if adapter_for(loaded.model).patch_embedding_weight() is None:
        why = ("A hybrid's tokens come from a CNN feature map, not from pixels" if loaded.info.family == "hybrid"
               else "This model's stem is not a linear projection of non-overlapping patches")
        st.info(f"{why}, so it has no pixel-space patch filters. Pick a ViT to see them; what else applies is below.")
        return
    filters, pca, explained = state.patch_filters(loaded.key, loaded)
    c1, c2 = st.columns(2, gap="large")
    with c1:
        n = st.slider("Filters shown", 8, max(8, len(filters)), min(64, len(filters)), 8, key="n_filters")
        st.plotly_chart(filters_figure(filters, max_filters=n, title=None), key="filters")
        st.caption("Each square is one learned linear filter that turns a patch of pixels into a token "
                   "(one per embedding dimension), shown as an RGB image.")
    with c2:
        st.plotly_chart(pca_figure(pca, explained, title=None), key="pca")
        st.caption(f"The top {len(pca)} principal components of those filters ({100 * float(sum(explained)):.0f} % "
                   "of their variance). In the paper they look like plausible basis functions for the fine "
                   "structure within each patch — much like a CNN's first-layer filters.")


@ui.fragment("the position embeddings")
def position_section(loaded: state.Loaded) -> None:
    from vitviz.explain import adapter_for
    from vitviz.plots.explain import patch_similarity_figure, similarity_grid_figure

    st.subheader("Position embeddings", divider="gray")
    if adapter_for(loaded.model).position_embedding() is None:
        st.info("This model learns no absolute position embeddings (it encodes positions relatively, by rotation, "
                "or through convolutions), so there is no position-similarity map to show.")
        return
    sim = state.position_similarity(loaded.key, loaded)  # (gh, gw, gh, gw)
    gh, gw = sim.shape[:2]
    c1, c2 = st.columns([1.4, 1], gap="large")
    with c1:
        fig = similarity_grid_figure(sim, title=None)
        fig.update_layout(height=520)
        st.plotly_chart(fig, key="pos_grid")
        st.caption(f"Tile (row, column) of this {gh}×{gw} grid shows how similar that patch's position embedding is "
                   f"to every other patch's (cosine). {position_similarity_caption(sim)}")
    with c2:
        st.session_state.setdefault(f"pos_row_{gh}", gh // 2)
        st.session_state.setdefault(f"pos_col_{gw}", gw // 2)
        row = st.slider("Patch row", 0, gh - 1, key=f"pos_row_{gh}")
        col = st.slider("Patch column", 0, gw - 1, key=f"pos_col_{gw}")
        st.plotly_chart(patch_similarity_figure(sim, row, col, title=f"Patch ({row}, {col})"), key="pos_one")
        st.caption("One tile enlarged: the chosen patch (×) and its similarity to every other patch.")


@ui.fragment("the attention distances")
def distance_section(loaded: state.Loaded) -> None:
    from vitviz.plots.explain import attention_distance_figure

    st.subheader("Mean attention distance", divider="gray")
    n = st.select_slider("Images averaged", [4, 8, 16, 32], value=16, key="dist_images",
                         help="Bundled images of the model's dataset (shapes scenes, digits or photos).")
    dist = state.attention_distance(loaded.key, n, loaded)  # (depth, heads)
    c1, c2 = st.columns([1.6, 1], gap="large")
    with c1:
        st.plotly_chart(attention_distance_figure(dist, image_size=loaded.info.img_size, title=None), key="dist")
    with c2:
        st.markdown(
            "Each dot is one head: the average distance, in pixels, between a query patch and the patches it "
            "attends to, weighted by attention. It is the transformer's analogue of a CNN's receptive field.")
        st.markdown(attention_distance_caption(dist, loaded.info.img_size))
        st.caption(
            "In the ViT paper (ImageNet-scale training), some heads of the lowest layers already attend across "
            "most of the image while others stay local, and distances grow with depth; small models trained on "
            "small data need not follow it.")
        st.caption(f"Averaged over {n} bundled images at {loaded.info.img_size}×{loaded.info.img_size} px.")


ui.sidebar()
st.title("Embeddings")
st.caption("What a Vision Transformer learned before any image arrives: the filters that turn patches into tokens, "
           "where it thinks each patch sits, and how far each head looks — the ViT paper's Figure 7.")
loaded = ui.need_model(ui.current_model())
with ui.guard("the Embeddings page"):
    if not loaded.info.has_attention:
        st.info("This is a CNN: it has no patch embedding, position embeddings or attention we can record. Pick a "
                "ViT or hybrid in the sidebar (the Compare page puts the three families side by side).")
    else:
        st.markdown(f"{ui.family_badge(loaded.info)} **{ds.short_name(loaded.info)}**")
        filters_section(loaded)
        position_section(loaded)
        distance_section(loaded)
