"""Run the representation analyses on a set of models and write the report (Markdown, JSON, offline HTML).

For models A, B, ...: the CKA grid of every pair and of each model with itself; linear probes by
depth; the logit lens (agreement with the final prediction and accuracy; transformers with a head);
per-layer mean attention distance (transformers); t-SNE/UMAP maps of one layer's readout (the last
unless ``ReportSpec.embed_layer`` names another); the error gallery of each model explained by all.
Under ``torchrun`` the CKA grids are sharded over processes (``report.json`` records the world size
and, per grid, the batches each process computed); everything else runs on rank 0.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitviz.atomic import write_text_atomic
from vitviz.errors import ConfigError, VitvizError
from vitviz.represent.matrix import CKAResult, cka_matrix, world
from vitviz.represent.subjects import Subject, prepare, same_classes

__all__ = ["Data", "ReportSpec", "embed_layer_index", "layer_summary", "run_report"]


@dataclass
class Data:
    """Images (uint8) to analyse, with labels when known, and training images for the probes."""

    name: str
    test: torch.Tensor  # (N, 3, H, W) uint8
    test_labels: torch.Tensor | None
    train: torch.Tensor | None = None
    train_labels: torch.Tensor | None = None
    class_names: list[str] = field(default_factory=list)


@dataclass
class ReportSpec:
    """What to compute and where to write it."""

    out: Path
    rep: str = "flat"
    batch_size: int = 128
    embed: str = "tsne"  # tsne | umap | none
    embed_n: int = 500
    embed_layer: int | str = -1  # the maps' layer: an index into each model's layers (-1: the last), or a name
    gallery: int = 6
    progress: bool = True
    distance_n: int = 256  # images for the attention distances


def layer_summary(result: CKAResult) -> dict[str, float]:
    """Numbers that describe a model-vs-itself grid: how uniform its layers are (Raghu et al.'s Fig. 1)."""
    g = result.grid
    n = g.shape[0]
    off = g[~np.eye(n, dtype=bool)]
    adjacent = [g[i, i + 1] for i in range(n - 1)]
    half = max(1, n // 2)
    return {"mean_offdiagonal": float(off.mean()) if off.size else 1.0,
            "mean_adjacent": float(np.mean(adjacent)) if adjacent else 1.0,
            "first_last": float(g[0, -1]),
            "lower_upper_half": float(g[:half, half:].mean()) if n > 1 else 1.0}


def run_report(subjects: list[Subject], data: Data, spec: ReportSpec,
               log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Compute everything and write ``report.md``, ``report.json`` and ``figures/*.html`` into ``spec.out``.

    Returns the report (rank 0), None on the other ``torchrun`` ranks.
    """
    if len(subjects) < 1:
        raise ConfigError("give at least one model to analyse.")
    embed_at = {s.name: embed_layer_index(s, spec.embed_layer) for s in subjects} if spec.embed != "none" else {}
    rank, size = world()
    report: dict[str, Any] = {"dataset": data.name, "images": int(data.test.shape[0]), "rep": spec.rep,
                              "world_size": size,
                              "models": [{"name": s.name, "family": s.family} for s in subjects], "cka": []}
    pairs = [(i, j) for i in range(len(subjects)) for j in range(i, len(subjects))]
    grids: list[CKAResult] = []
    for i, j in pairs:
        a, b = subjects[i], subjects[j]
        if rank == 0:
            log(f"CKA {a.name} vs {b.name} over {data.test.shape[0]} images")
        res = cka_matrix(a, b, data.test, rep=spec.rep, batch_size=spec.batch_size, progress=spec.progress)
        grids.append(res)
        entry = res.to_dict()
        if i == j:
            entry["summary"] = layer_summary(res)
        report["cka"].append(entry)
    if rank != 0:
        return None
    out = Path(spec.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Any]] = []
    from vitviz.represent.figures import Curve, cka_figure, curves_figure, embedding_figure, lens_figure

    for res in grids:
        figures.append((f"cka_{_slug(res.name_a)}__{_slug(res.name_b)}", cka_figure(res)))

    report["probes"], report["lens"], report["attention_distance"], report["accuracy"] = [], [], [], {}
    readouts = {}
    for s in subjects:
        log(f"probes and logit lens of {s.name}")
        r_test = _readouts(s, data.test, spec.batch_size)
        readouts[s.name] = r_test
        # accuracy and the lens's accuracy mean something only for a model that predicts the data's classes
        own = data.test_labels is not None and same_classes(s, data.name, data.class_names)
        if own:
            report["accuracy"][s.name] = float((r_test.pred == data.test_labels).float().mean())
        if data.train is not None and data.train_labels is not None and data.test_labels is not None:
            from vitviz.represent.probes import probe_layers

            r_train = _readouts(s, data.train, spec.batch_size, lens=False)
            pr = probe_layers(r_train.features, data.train_labels, r_test.features, data.test_labels,
                              labels=r_test.labels, stages=r_test.stages, name=s.name)
            report["probes"].append(pr.to_dict())
        lens = _lens(s, r_test, data.test_labels if own else None)
        if lens is not None:
            report["lens"].append(lens)
        dist = _distances(s, data.test[: spec.distance_n], spec.batch_size)
        if dist is not None:
            report["attention_distance"].append(dist)
    if report["probes"]:
        figures.append(("probes", curves_figure([Curve(p["model"], p["test_accuracy"], labels=p["labels"])
                                                 for p in report["probes"]], "Linear probe test accuracy by depth")))
    if report["lens"]:
        figures.append(("logit_lens", lens_figure(report["lens"], "Logit lens: top-1 agreement with the final "
                                                                  "prediction (solid) and accuracy (dashed)")))

    if spec.embed != "none" and data.test_labels is not None:
        from vitviz.represent.embedding import embed_2d

        n = min(spec.embed_n, data.test.shape[0])
        layers = {}
        for s in subjects:
            k = embed_at[s.name]
            coords = embed_2d(readouts[s.name].features[k][:n], spec.embed)
            labels = data.test_labels[:n].numpy()
            hover = [f"test #{i}" for i in range(n)]
            names = readouts[s.name].labels
            layers[s.name] = names[k]
            figures.append((f"embedding_{_slug(s.name)}", embedding_figure(
                coords, labels, data.class_names, hover,
                title=f"{spec.embed} of {s.name} at {names[k]} (layer {k + 1} of {len(names)})")))
        report["embedding"] = {"method": spec.embed, "images": n, "layers": layers}

    if spec.gallery > 0 and data.test_labels is not None:
        report["gallery"] = _write_gallery(subjects, data, readouts, spec, out)

    for name, fig in figures:
        fig.write_html(out / "figures" / f"{name}.html", include_plotlyjs="directory")
    report["figures"] = [f"figures/{name}.html" for name, _ in figures]
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    write_text_atomic(out / "report.md", markdown(report))
    log(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(figures)} figures in {out / 'figures'}")
    return report


def embed_layer_index(subject: Subject, layer: int | str) -> int:
    """The index (0-based, from the first layer) of ``layer`` among ``subject``'s layers: an index (negative
    counts from the last) or a layer name as :func:`~vitviz.represent.features.layer_labels` gives it."""
    from vitviz.represent.features import layer_labels

    labels = layer_labels(subject.model)
    if isinstance(layer, str):
        if layer not in labels:
            raise ConfigError(f"{subject.name} has no layer {layer!r}; its layers are {', '.join(labels)} "
                              "(or give an index, -1 for the last).")
        return labels.index(layer)
    if not -len(labels) <= layer < len(labels):
        raise ConfigError(f"layer index {layer} is out of range for {subject.name}, which has {len(labels)} layers "
                          f"({', '.join(labels)}).")
    return layer % len(labels)


def _readouts(s: Subject, images: torch.Tensor, batch_size: int, lens: bool = True):
    from vitviz.represent.features import collect_readouts

    batches = (prepare(s, images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size))
    return collect_readouts(s.model, batches, lens=lens)


def _lens(s: Subject, readouts: Any, labels: torch.Tensor | None) -> dict[str, Any] | None:
    """The logit lens of one model; its accuracy only when ``labels`` are given (the model predicts the
    dataset's classes: a timm ImageNet classifier's lens on shapes has agreement, not accuracy)."""
    from vitviz.represent.lens import logit_lens

    try:
        return logit_lens(readouts, labels, name=s.name).to_dict()
    except VitvizError:  # a CNN, or a transformer whose head does not read its blocks directly
        return None


def _distances(s: Subject, images: torch.Tensor, batch_size: int) -> dict[str, Any] | None:
    from vitviz.explain.adapters import adapter_for
    from vitviz.explain.distance import attention_distance

    if adapter_for(s.model).kind != "transformer":
        return None
    try:
        d = attention_distance(s.model, prepare(s, images), batch_size=min(batch_size, 64))  # (layers, heads)
    except VitvizError:
        return None
    per_layer = torch.nanmean(d, dim=1).tolist()
    return {"model": s.name, "img_size": s.img_size, "mean_px": [round(v, 3) for v in per_layer],
            "min_head_px": [round(float(v), 3) for v in torch.nan_to_num(d, nan=math.inf).min(dim=1).values],
            "max_head_px": [round(float(v), 3) for v in torch.nan_to_num(d, nan=-math.inf).max(dim=1).values]}


def _write_gallery(subjects: list[Subject], data: Data, readouts: dict[str, Any], spec: ReportSpec,
                   out: Path) -> list[dict[str, Any]]:
    from vitviz.represent.gallery import error_gallery

    rows, html = [], ["<html><head><meta charset='utf-8'><title>Error gallery</title></head><body>",
                      "<h1>Error gallery</h1><p>Each row: an image the named model got wrong, explained by every "
                      "model (its own prediction).</p>"]
    for k, s in enumerate(subjects):
        if not same_classes(s, data.name, data.class_names):  # its "errors" would be other classes' indices
            html.append(f"<h2>{s.name}: its classes are not this data's, so it has no errors to show</h2>")
            continue
        items = error_gallery(subjects, data.test, data.test_labels, of=k, limit=spec.gallery,
                              pred=readouts[s.name].pred)
        html.append(f"<h2>{s.name}: {len(items)} shown</h2>")
        for item in items:
            true = _name(data.class_names, item.label)
            cells = [f"<td>{_png(item.image)}<br>test #{item.index}<br>true: {true}</td>"]
            for e in item.explained:
                cells.append(f"<td>{_png(_overlay(item.image, e.saliency))}<br>{e.model} ({e.method})<br>"
                             f"says {_name(data.class_names, e.pred)} ({e.confidence:.2f})</td>")
            html.append("<table><tr>" + "".join(cells) + "</tr></table>")
            rows.append({"model": s.name, "index": item.index, "label": item.label,
                         "predictions": {e.model: e.pred for e in item.explained}})
    html.append("</body></html>")
    write_text_atomic(out / "figures" / "gallery.html", "\n".join(html))
    return rows


def _overlay(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    from vitviz.images import nearest_resize

    sal = nearest_resize(saliency, image.shape[:2]) if saliency.shape != image.shape[:2] else saliency
    heat = np.stack([sal, np.zeros_like(sal), 1.0 - sal], axis=-1) * 255.0  # red = salient, blue = not
    return (0.5 * image + 0.5 * heat).clip(0, 255).astype(np.uint8)


def _png(image: np.ndarray, scale: int = 4) -> str:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image)).resize((image.shape[1] * scale, image.shape[0] * scale),
                                                              Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _name(names: list[str], k: int) -> str:
    return names[k] if 0 <= k < len(names) else f"class {k}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = [f"# Representations: {', '.join(m['name'] for m in report['models'])}", "",
             f"Dataset `{report['dataset']}`, {report['images']} test images; CKA on `{report['rep']}` features "
             "(unbiased minibatch estimator)" + (f", sharded over {report['world_size']} processes"
                                                 if report.get("world_size", 1) > 1 else "") + ".", ""]
    if report.get("accuracy"):
        lines += ["| model | test accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in report["accuracy"].items()] + [""]
    lines += ["## CKA", "", "| A | B | layers | mean | max | model vs itself: mean off-diagonal / adjacent / "
              "first-last |", "|---|---|---|---|---|---|"]
    for c in report["cka"]:
        g = np.asarray(c["grid"])
        s = c.get("summary")
        own = f"{s['mean_offdiagonal']:.3f} / {s['mean_adjacent']:.3f} / {s['first_last']:.3f}" if s else ""
        lines.append(f"| {c['a']} | {c['b']} | {g.shape[0]} x {g.shape[1]} | {g.mean():.3f} | {g.max():.3f} | {own} |")
    for c in report["cka"]:
        lines += ["", f"### {c['a']} (rows) vs {c['b']} (columns)", "",
                  "| | " + " | ".join(c["labels_b"]) + " |", "|---" * (len(c["labels_b"]) + 1) + "|"]
        lines += [f"| {la} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
                  for la, row in zip(c["labels_a"], c["grid"], strict=True)]
    for key, title, field_ in (("probes", "Linear probes (test accuracy by layer)", "test_accuracy"),
                               ("lens", "Logit lens (top-1 agreement with the final prediction)", "agreement"),
                               ("lens", "Logit lens (accuracy)", "accuracy"),
                               ("attention_distance", "Mean attention distance (px, mean over heads)", "mean_px")):
        rows = [r for r in report.get(key, []) if r.get(field_) is not None]
        if not rows:
            continue
        lines += ["", f"## {title}", ""]
        for r in rows:
            lines.append(f"- **{r['model']}**: " + ", ".join(f"{v:.3f}" for v in r[field_]))
    if report.get("figures"):
        lines += ["", "## Figures", ""] + [f"- [{f}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"
