"""Compare: ViT vs hybrid vs ResNet — scores, training, data efficiency, explanations and their faithfulness."""

from __future__ import annotations

import streamlit as st

from dashboard import state, trust_panel, ui
from dashboard import support as ds


def scores_section(infos: list[ds.ModelInfo]) -> None:
    from vitviz.plots.training import accuracy_bars

    st.subheader("Scores on the test split", divider="gray")
    rows = ds.drop_empty_columns(ds.metrics_rows(infos))
    st.dataframe(rows, hide_index=True, key="scores", column_config={
        "Accuracy %": st.column_config.NumberColumn(format="%.2f"),
        "Macro precision %": st.column_config.NumberColumn(format="%.2f"),
        "Macro recall %": st.column_config.NumberColumn(format="%.2f"),
        "Macro F1 %": st.column_config.NumberColumn(format="%.2f"),
    })
    c1, c2 = st.columns([1.4, 1], gap="large", vertical_alignment="center")
    with c1:
        bars = ds.accuracy_rows(infos)
        if bars:
            fig = accuracy_bars(bars, title="")
            fig.update_layout(height=320, margin={"t": 20})
            st.plotly_chart(fig, key="bars")
        else:
            st.info("These checkpoints carry no test metrics; `vitviz train` stores them.")
    with c2:
        st.markdown("**Accuracy** is the share of test images classified correctly. **Macro F1** averages the "
                    "F1 score (the balance of precision and recall) over classes, so a class the model neglects "
                    "costs as much as a common one.")
        st.caption("Numbers come from each checkpoint's own metadata, measured on the test split when it was "
                   "trained.")


@ui.fragment("the training curves")
def curves_section(infos: list[ds.ModelInfo]) -> None:
    from vitviz.plots.training import training_curves

    st.subheader("Training curves", divider="gray")
    curves = {ds.short_name(i): ds.curves_of(i) for i in infos}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        st.info("These checkpoints carry no training curves; `vitviz train` stores them with every checkpoint.")
        return
    metrics = ds.curve_metrics(curves.values())
    c1, c2 = st.columns([1, 3])
    with c1:
        metric = st.selectbox("Metric", metrics, key="curve_metric", format_func=lambda m: m.replace("_", " "))
        axes = {"epoch": "epoch", "elapsed_s": "training time (s)", "cpu_s": "CPU time (s)"}
        present = [a for a in axes if a == "epoch" or any(a in r for rows in curves.values() for r in rows)]
        x = st.radio("Against", present, key="curve_x", format_func=axes.get,
                     help="On a shared machine CPU time is the fairer clock: wall time counts others' jobs too.")
        st.caption("Transformers have fewer built-in assumptions about images than CNNs, so on small data they "
                   "usually learn more slowly per epoch.")
    with c2:
        fig = training_curves(curves, metric=metric, x=x, families={ds.short_name(i): i.family for i in infos})
        fig.update_layout(height=340)
        st.plotly_chart(fig, key="curves")


def confusion_section(infos: list[ds.ModelInfo]) -> None:
    from vitviz.plots.training import confusion_matrix_figure

    st.subheader("Confusion matrices", divider="gray")
    have = [(i, ds.confusion_of(i)) for i in infos]
    have = [(i, cm) for i, cm in have if cm is not None]
    if not have:
        st.info("These checkpoints carry no confusion matrix; `vitviz train` stores the test one.")
        return
    for col, (info, cm) in zip(st.columns(len(have)), have, strict=True):
        with col:
            names = list(info.class_names)[: len(cm)]
            fig = confusion_matrix_figure(cm, names, title=f"{ds.short_name(info)} · {info.family_label}")
            fig.update_layout(height=360, margin={"l": 50, "r": 10, "t": 50, "b": 40}, title_font_size=14)
            fig.update_traces(showscale=False)
            st.plotly_chart(fig, key=f"cm_{ds.short_name(info)}")
    st.caption("Rows are the true class, columns the prediction; the diagonal holds the correct answers. "
               "Colour is the fraction of each true class, so off-diagonal cells show which classes get confused.")


def efficiency_section(dataset: str) -> None:
    from vitviz.plots.training import data_efficiency_lines

    st.subheader("Data efficiency", divider="gray")
    found = [r for r in state.results("data-efficiency") if str(r.get("dataset")) == dataset]
    if not found:
        st.info(f"No data-efficiency results for *{dataset}* yet. Run `vitviz compare --preset data-efficiency "
                f"--dataset {dataset} --out results/data_efficiency_{dataset}` to fill this.")
        return
    summary = found[0]
    fig = data_efficiency_lines(summary["rows"], title="")
    fig.update_layout(height=360, margin={"t": 20})
    st.plotly_chart(fig, key="efficiency")
    st.caption("Test accuracy when training on a fraction of the training split. The ViT paper's point: "
               "transformers lack a CNN's built-in locality, so they need more data to catch up — and overtake "
               "it given enough. Source: " + str(summary.get("path", "")))


def pick_picture(dataset: str) -> state.Picture:
    names = ds.dataset_samples(dataset)
    explored = st.session_state.get(state.PICTURE_KEY)
    options = ([explored.key] if explored is not None and explored.key not in (f"sample:{n}" for n in names) else [])
    options += [f"sample:{n}" for n in names]
    label = {f"sample:{n}": n for n in names}
    if explored is not None:
        label[explored.key] = f"the image on Explore ({explored.name})"
    key = st.selectbox("Image", options, key=f"cmp_image_{dataset}", format_func=label.get)
    if explored is not None and key == explored.key:
        return explored
    return state.sample(key.removeprefix("sample:"))


def side_by_side_section(models: list[state.Loaded], dataset: str) -> state.Picture:
    from vitviz.explain import METHOD_LABELS, METHODS
    from vitviz.plots.explain import map_label, overlay_figure

    st.subheader("One image, every model", divider="gray")
    c1, c2 = st.columns(2)
    with c1:
        picture = pick_picture(dataset)
    with c2:
        method = st.selectbox("Method for ViT and hybrid", [m for m in METHODS if m not in ("attention", "similarity")],
                              index=2, key="cmp_method", format_func=lambda m: METHOD_LABELS.get(m, m),
                              help="ResNets have no attention: they are always explained with Grad-CAM.")
    for col, loaded in zip(st.columns(len(models)), models, strict=True):
        with col:
            subject = state.Subject(loaded, picture)
            m = method if loaded.info.has_attention else "gradcam"
            probs = state.probabilities(*subject.key, subject)
            name, p, _ = ds.topk(probs, loaded.info.class_names, 1)[0]
            emap = state.explanation(*subject.key, m, ds.params_key({}), subject, {})
            fig = overlay_figure(subject.fitted_array, emap, opacity=0.5, colorscale="jet", mask=subject.mask,
                                 point=ds.peak(emap), label=map_label(m))
            fig.update_traces(showscale=False, selector={"type": "heatmap"})
            fig.update_layout(height=300)
            st.markdown(f"{ui.family_badge(loaded.info)} **{ds.short_name(loaded.info)}**")
            st.plotly_chart(fig, key=f"side_{ds.short_name(loaded.info)}", config={"displayModeBar": False})
            st.caption(f"{METHOD_LABELS.get(m, m)} · predicts **{name}** ({100 * p:.0f} %)")
    return picture


@ui.fragment("the side-by-side explanations")
def explanations_section(models: list[state.Loaded], dataset: str) -> None:
    """Side-by-side overlays and their faithfulness: a new image reruns both, not the whole page."""
    picture = side_by_side_section(models, dataset)
    trust_panel.compare_panel(models, picture, dataset)  # the one scorer (vitviz.explain.trust)


ui.sidebar()
st.title("Compare")
st.caption("The checkpoints trained on one dataset, side by side (each with its own recipe, stored in its "
           "metadata): how well they do, how they learn, and whether they look at the same evidence.")
with ui.guard("the Compare page"):
    folder = ui.checkpoint_folder()
    entries = [e for e in state.list_checkpoints(folder) if e.usable]
    if not entries:
        st.info(f"No usable checkpoints in {folder}. Train some with `vitviz train`, or name a folder in the sidebar.")
        st.stop()
    datasets = sorted({str(e.meta.dataset or "unknown") for e in entries})
    current = ui.current_model()
    ours = str(current.info.dataset) if current is not None and current.info.dataset in datasets else None
    default = ours or ("shapes" if "shapes" in datasets else datasets[0])
    # Keyed by the sidebar model's dataset: Compare opens on the dataset of the model picked in the sidebar.
    dataset = st.segmented_control("Dataset", datasets, default=default, key=f"cmp_dataset_{default}", required=True)
    chosen = [e for e in entries if str(e.meta.dataset or "unknown") == dataset]
    device = st.session_state.get("device", "cpu")
    models = [state.load_checkpoint(e.path, e.key, device) for e in chosen]
    infos = [m.info for m in models]
    st.caption(f"{len(models)} checkpoints from {ds.display_path(folder)}: "
               + ", ".join(ds.short_name(i) for i in infos))
    scores_section(infos)
    curves_section(infos)
    confusion_section(infos)
    efficiency_section(dataset)
    explanations_section(models, dataset)
