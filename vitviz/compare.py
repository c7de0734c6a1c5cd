"""``vitviz compare``: train and evaluate several models on one dataset; tables and plots.

Two presets: ``study`` (the reference student project's comparison — ViT patch 4 vs 8, depth 8 vs 12,
a hybrid and a ResNet-34 — at reduced width so it runs on a laptop CPU) and ``data-efficiency``
(one model per family trained on 10/25/50/100 % of the training split, every run given the same
number of optimiser steps, so the curves compare data, not compute). ``--models a,b,c`` compares
any presets with the family's recipe.

Every run is an ordinary ``train`` run in its own sub-directory, so a comparison is resumable and
each of its models can be opened in the dashboard.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitviz.atomic import write_text_atomic
from vitviz.errors import ConfigError
from vitviz.models.registry import preset_config

__all__ = ["FAMILY_RECIPES", "PRESETS", "CompareSpec", "RunSpec", "markdown_table", "run_compare"]

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 1.0)

# Per-family training recipes (TrainConfig fields) for the small bundled datasets: the shipped
# checkpoints' recipes (checkpoints/README.md) with plain initialisation and short schedules. The hybrid's
# backbone keeps stride 2 at 16 px and stride 4 at 32 px, so every transformer here sees an 8x8 token grid
# except the 16-px ViT (patch 4: 4x4).
FAMILY_RECIPES: dict[str, dict[str, Any]] = {
    "vit": {"embed_dim": 96, "depth": 6, "num_heads": 4, "pooling": "mean", "schedule": "onecycle", "lr": 2e-3,
            "warmup_epochs": 1, "affine": True, "batch_size": 64, "select": "last"},
    "hybrid": {"embed_dim": 64, "depth": 4, "num_heads": 4, "pooling": "mean", "width": 16,
               "schedule": "onecycle", "lr": 2e-3, "warmup_epochs": 1, "affine": True, "batch_size": 64,
               "select": "last"},
    "resnet": {"width": 16, "layers": (2, 2, 2, 2), "schedule": "onecycle", "lr": 4e-3, "warmup_epochs": 1,
               "affine": True, "batch_size": 64, "select": "last"},
}
HYBRID_LAYERS = {16: (1, 1), 32: (1, 1, 1)}  # backbone stages per input size: an 8x8 token grid


@dataclass(frozen=True)
class RunSpec:
    """One row of a comparison: a model preset, its training settings and the train fraction."""

    name: str  # row label, also the run's sub-directory
    model: str  # preset name
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    train_fraction: float = 1.0


@dataclass(frozen=True)
class CompareSpec:
    """A whole comparison: runs on one dataset for a number of epochs."""

    kind: str  # "models" or "data-efficiency"
    dataset: str
    epochs: int  # epochs of a full-data run (data-efficiency scales them by 1 / fraction)
    runs: tuple[RunSpec, ...]
    img_size: int | None = None
    seed: int = 0
    limit_train: int | None = None
    limit_eval: int | None = None

    @classmethod
    def from_cli(cls, *, preset: str | None, models: str | None, dataset: str, epochs: int | None,
                 fractions: str | None = None, img_size: int | None = None, seed: int = 0,
                 limit_train: int | None = None, limit_eval: int | None = None) -> CompareSpec:
        """Build a spec from the ``vitviz compare`` flags (ConfigError on a bad combination)."""
        if preset is None and not models:
            raise ConfigError("give --preset study, --preset data-efficiency or --models a,b,c.")
        wanted = [m.strip() for m in models.split(",") if m.strip()] if models else None
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        kind = "data-efficiency" if preset == "data-efficiency" else "models"
        base = PRESETS.get(preset, {}) if preset else {}
        if preset is None:
            runs = [RunSpec(name=m, model=m, settings=_recipe(m)) for m in wanted or []]
        else:
            runs = list(base["runs"])
            if wanted:  # narrow a preset to some of its rows
                unknown = sorted(set(wanted) - {r.name for r in runs} - {r.model for r in runs})
                if unknown:
                    names = ", ".join(r.name for r in runs)
                    raise ConfigError(f"--models {','.join(unknown)} not in preset {preset!r} (its rows: {names}).")
                runs = [r for r in runs if r.name in wanted or r.model in wanted]
        if kind == "data-efficiency":
            fracs = _fractions(fractions) if fractions else DEFAULT_FRACTIONS
            runs = [RunSpec(name=f"{r.name}_f{round(f * 100):03d}", model=r.model, settings=r.settings,
                            train_fraction=f) for r in runs for f in fracs]
        elif fractions:
            raise ConfigError("--fractions only applies to --preset data-efficiency.")
        for r in runs:
            preset_config(r.model)  # unknown model names fail now, before any training
        n_epochs = epochs if epochs is not None else base.get("epochs", 10)
        if n_epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {n_epochs}.")
        return cls(kind=kind, dataset=dataset, epochs=n_epochs, runs=tuple(runs),
                   img_size=img_size if img_size is not None else base.get("img_size"), seed=seed,
                   limit_train=limit_train, limit_eval=limit_eval)

    def epochs_for(self, run: RunSpec) -> int:
        """Epochs of one run: data-efficiency runs on a fraction f get ceil(epochs / f), the same steps."""
        return math.ceil(self.epochs / run.train_fraction - 1e-9) if self.kind == "data-efficiency" else self.epochs

    def settings_for(self, run: RunSpec) -> dict[str, Any]:
        """TrainConfig fields of one run: its recipe, with warmup scaled like the epochs (equal steps)."""
        settings = dict(run.settings)
        if self.kind == "data-efficiency" and "warmup_epochs" in settings:
            settings["warmup_epochs"] = settings["warmup_epochs"] * self.epochs_for(run) / self.epochs
        family, _ = preset_config(run.model)
        if family == "hybrid" and "layers" not in settings and self.img_size in HYBRID_LAYERS:
            settings["layers"] = HYBRID_LAYERS[self.img_size]
        return settings


def _recipe(model: str) -> dict[str, Any]:
    family, _ = preset_config(model)
    return dict(FAMILY_RECIPES[family])


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise ConfigError(f"--fractions must be comma-separated numbers such as 0.1,0.5,1, got {text!r}.") from err
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise ConfigError(f"--fractions must lie in (0, 1], got {text!r}.")
    return values


# The reference student project compared, on CIFAR-10: ViT patch 8 / 12 blocks, ViT patch 4 / 8
# blocks, a hybrid (frozen pretrained ResNet-34 stem) and ResNet-34. Here every model is trained from
# scratch at reduced width (ViT width 64; ResNet-34 width 16), at 32 px so patch 8 still gives a 4x4 grid.
_STUDY_VIT = {**FAMILY_RECIPES["vit"], "embed_dim": 64, "num_heads": 4}
PRESETS: dict[str, dict[str, Any]] = {
    "study": {
        "epochs": 15,
        "img_size": 32,
        "runs": (
            RunSpec("vit_p8_d12", "vit_p8_d12_32", {**_STUDY_VIT, "depth": 12}),
            RunSpec("vit_p8_d8", "vit_p8_d8_32", {**_STUDY_VIT, "depth": 8}),
            RunSpec("vit_p4_d12", "vit_p4_d12_32", {**_STUDY_VIT, "depth": 12}),
            RunSpec("vit_p4_d8", "vit_p4_d8_32", {**_STUDY_VIT, "depth": 8}),
            RunSpec("hybrid_r18", "hybrid_r18_vit_32", {**FAMILY_RECIPES["hybrid"], "embed_dim": 64, "depth": 6,
                                                        "layers": (2, 2, 2)}),
            RunSpec("resnet34", "resnet34_32", {**FAMILY_RECIPES["resnet"], "layers": (3, 4, 6, 3)}),
        ),
    },
    "data-efficiency": {
        "epochs": 15,
        "img_size": 16,
        "runs": (
            RunSpec("vit", "vit_p4_d8_32", {**FAMILY_RECIPES["vit"], "patch_size": 4}),
            RunSpec("hybrid", "hybrid_r18_vit_32", dict(FAMILY_RECIPES["hybrid"])),
            RunSpec("resnet", "resnet18_32", dict(FAMILY_RECIPES["resnet"])),
        ),
    },
}


# --------------------------------------------------------------------------------------------------
# running


def run_compare(spec: CompareSpec, *, out: str | Path, device: str = "auto", threads: int | None = None,
                resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and test every run of ``spec`` (each in ``out/<name>``); write the tables and plots.

    With ``resume``, finished runs are reused and unfinished ones resumed; otherwise ``out`` must not
    hold runs of the same names. Returns the summary also written to ``out/results.json``.
    """
    from vitviz.training import TrainConfig, train

    out = Path(out)
    rows = []
    for run in spec.runs:
        run_dir = out / run.name
        done = run_dir / "results.json"
        if not (resume and done.exists()):
            settings = {**spec.settings_for(run), "img_size": spec.img_size, "seed": spec.seed, "device": device,
                        "threads": threads, "progress": progress, "limit_train": spec.limit_train,
                        "limit_eval": spec.limit_eval, "train_fraction": run.train_fraction}
            config = TrainConfig.from_dict({
                "model": run.model, "dataset": spec.dataset, "epochs": spec.epochs_for(run), "out": str(run_dir),
                "resume": resume, **{k: v for k, v in settings.items() if v is not None},
            })
            train(config)
        rows.append(_row(run, json.loads(done.read_text())))
    return write_results(spec, rows, out)


def _row(run: RunSpec, result: dict[str, Any]) -> dict[str, Any]:
    m, test = result["metrics"], result["test"]
    curves = result["curves"]
    return {
        "name": run.name, "model": run.model, "family": result["family"], "train_fraction": run.train_fraction,
        "num_train": result.get("num_train"), "num_params": result["num_params"], "epochs": len(curves),
        "best_epoch": result["best_epoch"], "val_accuracy": m.get("val_accuracy"),
        "test_accuracy": test["accuracy"], "test_macro_precision": test["macro_precision"],
        "test_macro_recall": test["macro_recall"], "test_macro_f1": test["macro_f1"],
        "train_time_s": m.get("train_time_s"), "cpu_time_s": m.get("cpu_time_s"),
        "confusion_matrix": test["confusion_matrix"],
        "class_names": [c["name"] for c in test["per_class"]], "curves": curves,
        "settings": result["train_config"],
    }


def markdown_table(rows: Sequence[dict[str, Any]], *, fractions: bool = False) -> str:
    """A Markdown table of comparison rows (accuracy, macro F1, parameters, wall and CPU training time)."""
    head = ["model", "preset", "params", "epochs", "test acc (%)", "macro F1", "train time (s)", "CPU time (s)"]
    if fractions:
        head.insert(2, "train fraction")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["name"], f"`{r['model']}`", f"{r['num_params'] / 1e6:.2f} M", str(r["epochs"]),
                 f"{100 * r['test_accuracy']:.2f}", f"{r['test_macro_f1']:.4f}", f"{r['train_time_s']:.0f}",
                 f"{r.get('cpu_time_s') or 0:.0f}"]
        if fractions:
            cells.insert(2, f"{100 * r['train_fraction']:.0f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(spec: CompareSpec, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write ``results.md``, ``results.json`` and the plotly HTML figures into ``out``."""
    from vitviz.plots.training import accuracy_bars, confusion_matrix_figure, data_efficiency_lines, training_curves

    out.mkdir(parents=True, exist_ok=True)
    efficiency = spec.kind == "data-efficiency"
    title = f"{'Data efficiency' if efficiency else 'Comparison'} on {spec.dataset}"
    md = f"## {title}\n\n" + markdown_table(rows, fractions=efficiency)
    plots = {
        "accuracy": accuracy_bars(rows, title=f"{title}: test accuracy and macro F1"),
        "curves": training_curves({r["name"]: r["curves"] for r in rows}, title=f"{title}: validation accuracy",
                                  families={r["name"]: r["family"] for r in rows}),
    }
    if efficiency:
        plots["data_efficiency"] = data_efficiency_lines(rows, title=f"{title}: test accuracy vs training data")
    else:
        for r in rows:
            plots[f"confusion_{r['name']}"] = confusion_matrix_figure(
                r["confusion_matrix"], r["class_names"], title=f"{r['name']} on {spec.dataset} (test)")
    plot_paths = []
    for key, fig in plots.items():
        path = out / f"{key}.html"
        # plotly.js once per folder, next to the pages: they open offline (a CDN link would not)
        fig.write_html(path, include_plotlyjs="directory")
        plot_paths.append(str(path))
    summary = {"kind": spec.kind, "dataset": spec.dataset, "epochs": spec.epochs, "img_size": spec.img_size,
               "seed": spec.seed, "rows": rows, "plots": [Path(p).name for p in plot_paths]}
    write_text_atomic(out / "results.md", md)
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1))
    # The files are named relative to ``out`` in results.json (it can be moved); full paths for the caller.
    return {**summary, "markdown_path": str(out / "results.md"), "json_path": str(out / "results.json"),
            "plot_paths": plot_paths}
