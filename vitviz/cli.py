"""The ``vitviz`` command line: ``train``, ``evaluate``, ``compare``, ``explain`` and ``models`` / ``datasets``.

Every user mistake ends as one ``error: ...`` line on stderr saying what to do, never a traceback:
exit status 2 for bad arguments and input files (as argparse's own usage errors), 1 for a run that
cannot start or go on (a non-finite loss, a run directory that would be overwritten), 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from vitviz.errors import ConfigError, TrainingError, VitvizError
from vitviz.runtime import tune_allocator

# --- vitviz train: flag -> (TrainConfig field, type, help); defaults come from TrainConfig ---------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 2,2,2, got {text!r}") from err


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare string such as pooling=mean
    return key.strip().replace("-", "_"), value


_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    # (group, field, type, help)
    ("run", "model", str, "model preset (see `vitviz models`)"),
    ("run", "dataset", str, "dataset (see `vitviz datasets`)"),
    ("run", "epochs", int, "epochs of the schedule"),
    ("run", "out", str, "run directory (best/last checkpoints, training state, log.jsonl)"),
    ("run", "img_size", int, "input side in pixels (default: the preset's)"),
    ("run", "seed", int, "seed of initialisation, data order, augmentation and dropout (default 0)"),
    ("run", "device", str, "auto | cpu | cuda | cuda:N (default auto)"),
    ("run", "threads", int, "CPU threads for torch (default: one per core; 1 is faster on a busy shared CPU)"),
    ("run", "resume", bool, "continue the run in --out exactly where it stopped (left-out flags: the saved run's)"),
    ("run", "overwrite", bool, "replace a run already in --out"),
    ("run", "stop_after", int, "stop after this many epochs, as if interrupted (continue with --resume)"),
    ("run", "progress", bool, "show a progress bar (default on)"),
    ("optimisation", "batch_size", int, "global batch size, split over processes (default 128)"),
    ("optimisation", "lr", float, "peak learning rate (default 1e-3)"),
    ("optimisation", "min_lr", float, "final learning rate of the cosine schedule (default 0)"),
    ("optimisation", "weight_decay", float, "AdamW weight decay; never on norms, biases, embeddings (default 0.05)"),
    ("optimisation", "beta1", float, "AdamW beta1 (default 0.9)"),
    ("optimisation", "beta2", float, "AdamW beta2 (default 0.999)"),
    ("optimisation", "schedule", str, "cosine (linear warmup + cosine) | onecycle | constant (default cosine)"),
    ("optimisation", "warmup_epochs", float, "warmup / rising phase in epochs (default 1)"),
    ("optimisation", "label_smoothing", float, "label smoothing (default 0.1)"),
    ("optimisation", "clip_grad", float, "max gradient norm, 0 = off (default 1.0)"),
    ("optimisation", "select", str, "what best.safetensors keeps: val_accuracy (default) | val_loss | last"),
    ("optimisation", "distill", str, "teacher checkpoint: add a soft-target distillation loss (DeiT-style)"),
    ("optimisation", "distill_alpha", float, "weight of the distillation loss (default 0.5)"),
    ("optimisation", "distill_temperature", float, "distillation softmax temperature (default 2)"),
    ("optimisation", "ema", float, "decay of a moving average of the weights, validated and saved (e.g. 0.999; "
     "default 0 = off)"),
    ("model", "patch_size", int, "ViT patch size"),
    ("model", "embed_dim", int, "ViT width"),
    ("model", "depth", int, "ViT blocks"),
    ("model", "num_heads", int, "ViT attention heads"),
    ("model", "mlp_ratio", float, "ViT MLP width / embed_dim"),
    ("model", "pooling", str, "ViT pooling: token | mean"),
    ("model", "width", int, "ResNet (hybrid: backbone) channels after the stem"),
    ("model", "layers", _int_list, "ResNet (hybrid: backbone) blocks per stage, e.g. 2,2,2"),
    ("model", "init", str, "default | mimetic (attention init + sin-cos positions) | conv (attention layers "
                           "start as 3x3 convolutions); for ViTs on small data"),
    ("model", "dropout", float, "dropout rate"),
    ("model", "drop_path", float, "stochastic depth rate"),
    ("model", "attn_dropout", float, "attention-weight dropout"),
    ("augmentation", "crop_padding", int, "random crop after reflect-padding by this many pixels (default 0)"),
    ("augmentation", "flip", bool, "random horizontal flips"),
    ("augmentation", "affine", bool, "random rotation / scale / translation"),
    ("augmentation", "max_rotate", float, "affine: max rotation in degrees (default 10)"),
    ("augmentation", "max_scale", float, "affine: max relative scale change (default 0.1)"),
    ("augmentation", "max_translate", float, "affine: max shift as a fraction of the side (default 0.1)"),
    ("augmentation", "randaugment", bool, "RandAugment (2 ops, magnitude 9)"),
    ("augmentation", "mixup", float, "MixUp alpha, 0 = off"),
    ("augmentation", "cutmix", float, "CutMix alpha, 0 = off"),
    ("augmentation", "random_erase", float, "probability of random erasing: one rectangle per image set to the "
                                            "mean colour (DeiT: 0.25; default 0 = off)"),
    ("data", "data_root", str, "folder of the dataset files (torchvision sets, imagefolder)"),
    ("data", "download", bool, "download a missing torchvision dataset"),
    ("data", "train_fraction", float, "train on this stratified fraction of the training split (default 1)"),
    ("data", "limit_train", int, "use only this many training images (smoke tests)"),
    ("data", "limit_eval", int, "use only this many validation and test images (smoke tests)"),
    ("data", "eval_batch_size", int, "evaluation batch size (default 512)"),
    ("speed", "amp", str, "auto (bf16 on CUDA, off on CPU) | bf16 | off"),
    ("speed", "attention", str, "training attention kernel: auto (explicit on CPU, fused on GPU) | fused | explicit"),
    ("speed", "compile", bool, "torch.compile the model"),
    ("speed", "channels_last", str, "auto (on for CNNs) | on | off"),
]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, name, typ, text in _TRAIN_FLAGS:
        g = groups.setdefault(group, p.add_argument_group(group))
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            g.add_argument(flag, dest=name, type=typ, default=None, help=text, metavar=name.upper())
    groups["model"].add_argument("--model-arg", dest="model_args", type=_key_value, action="append", default=None,
                                 metavar="KEY=VALUE", help="any other model config field (repeatable), e.g. "
                                 "--model-arg mlp_ratio=2 --model-arg backbone_block=basic")


def train_config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`TrainConfig` the flags describe; with ``--resume``, left-out flags come from the saved run."""
    from vitviz.training import TrainConfig, saved_config

    given = {name: getattr(args, name) for _, name, _, _ in _TRAIN_FLAGS if getattr(args, name) is not None}
    if args.model_args:
        given["model_args"] = dict(args.model_args)
    if not given.get("out"):
        raise ConfigError("--out DIR is required: the directory the run writes its checkpoints and log to.")
    base: dict[str, Any] = {}
    if given.get("resume"):
        saved = saved_config(given["out"])
        if saved is not None:
            base = saved.to_dict()
            base.update({"resume": False, "overwrite": False, "stop_after": None})  # not inherited
    missing = [f"--{k}" for k in ("model", "dataset", "epochs") if k not in given and k not in base]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: a new run needs a model, a dataset and a number of epochs.")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in {**base, **given}.items() if k in fields})


def train_command(config: Any, *, out: str | None = None) -> str:
    """The shortest ``vitviz train`` command line that reproduces ``config`` (flags that differ from defaults).

    ``out`` replaces the run directory; run-control flags (resume, overwrite, stop_after, progress) are left out.
    """
    import shlex

    from vitviz.training import TrainConfig

    skip = {"out", "resume", "overwrite", "stop_after", "progress"}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    data = config.to_dict()
    parts = ["vitviz", "train"]
    for _, name, typ, _ in _TRAIN_FLAGS:
        value = data[name]
        if name in skip or (name in defaults and _same(value, defaults[name])):
            continue
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    for key, value in data["model_args"].items():
        parts += ["--model-arg", f"{key}={json.dumps(value)}"]
    parts += ["--out", out if out is not None else data["out"]]
    return " ".join(shlex.quote(p) for p in parts)


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return value == default


def _cmd_train(args: argparse.Namespace) -> int:
    from vitviz.training import train

    result = train(train_config_from_args(args))
    if result.finished and result.test is not None:
        print(json.dumps({"out": str(result.out), "best_epoch": result.best_epoch,
                          "val_accuracy": result.val_accuracy, "test_accuracy": result.test["accuracy"],
                          "test_macro_f1": result.test["macro_f1"], "train_time_s": round(result.train_time_s, 2)}))
    return 0


# --- vitviz evaluate -----------------------------------------------------------------------------


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from vitviz.evaluate import evaluate_checkpoint

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    report = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, split=args.split, data_root=args.data_root,
                                 download=args.download, device=args.device, batch_size=args.batch_size,
                                 limit=args.limit)
    print(json.dumps(report, indent=None if args.compact else 1))
    return 0


# --- vitviz compare ------------------------------------------------------------------------------


def _cmd_compare(args: argparse.Namespace) -> int:
    from vitviz.compare import CompareSpec, run_compare

    spec = CompareSpec.from_cli(preset=args.preset, models=args.models, dataset=args.dataset, epochs=args.epochs,
                                fractions=args.fractions, img_size=args.img_size, seed=args.seed,
                                limit_train=args.limit_train, limit_eval=args.limit_eval)
    summary = run_compare(spec, out=args.out, device=args.device, threads=args.threads, resume=args.resume,
                          progress=args.progress)
    print(json.dumps({"out": str(args.out), "table": summary["markdown_path"], "json": summary["json_path"],
                      "plots": summary["plot_paths"]}))
    return 0


# --- listings ------------------------------------------------------------------------------------


def _cmd_models(args: argparse.Namespace) -> int:
    if args.pretrained:
        from vitviz.models.pretrained import CURATED, hub_id

        for name, what in CURATED.items():
            print(f"timm:{name}\n    {what}\n    weights: https://huggingface.co/{hub_id(name)}")
        return 0
    from vitviz.models.registry import describe_model, list_models

    for name in list_models(args.family):
        print(f"{name:28s} {describe_model(name)}")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from vitviz.data import list_datasets

    print("\n".join(list_datasets()))
    return 0


# --- the parser and main -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error format (status 2, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``vitviz`` argument parser."""
    parser = _Parser(prog="vitviz", description="Train, evaluate and compare ViTs, hybrids and ResNets.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a model; checkpoints and log.jsonl go into --out",
                       description="Train a model (also data-parallel under torchrun).")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint; prints JSON metrics",
                       description="Evaluate a checkpoint on a dataset split; prints accuracy, macro "
                                   "precision/recall/F1, per-class scores and the confusion matrix as JSON.")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by vitviz")
    p.add_argument("--dataset", help="dataset name (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="default test")
    p.add_argument("--data-root", help="folder of the dataset files")
    p.add_argument("--download", action="store_true", help="download a missing torchvision dataset")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--limit", type=int, help="evaluate only the first N images of the split")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", help="train and evaluate several models on one dataset; tables and plots",
                       description="Train and evaluate a list of models (or a preset study) on one dataset and "
                                   "write results.md, results.json and plotly HTML plots into --out.")
    p.add_argument("--preset", choices=("study", "data-efficiency"), help="a predefined comparison")
    p.add_argument("--models", help="comma-separated presets (instead of, or to narrow, --preset)")
    p.add_argument("--dataset", default="digits", help="default digits")
    p.add_argument("--epochs", type=int, help="epochs per model (default: the preset's)")
    p.add_argument("--fractions", help="data-efficiency: comma-separated train fractions (default 0.1,0.25,0.5,1)")
    p.add_argument("--img-size", type=int, help="input side (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (one sub-directory per run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --out, resume unfinished ones")
    p.add_argument("--limit-train", type=int, help="smoke tests: training images per run")
    p.add_argument("--limit-eval", type=int, help="smoke tests: validation/test images per run")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=_cmd_compare)

    from vitviz.explain.cli import add_parser as add_explain_parser

    add_explain_parser(sub)  # `vitviz explain IMAGE ...`: its handler is set by the explain module

    from vitviz.represent.cli import add_parser as add_represent_parser

    add_represent_parser(sub)  # `vitviz represent --models ...`: CKA grids, probes, logit lens

    from vitviz.explain.trust_cli import add_parser as add_trust_parser

    add_trust_parser(sub)  # `vitviz trust --checkpoint F --images DIR --out DIR`: which explanation to trust

    p = sub.add_parser("models", help="list the model presets (or, with --pretrained, some real pretrained names)")
    p.add_argument("--family", choices=("vit", "hybrid", "resnet"))
    p.add_argument("--pretrained", action="store_true",
                   help="list a curated set of pretrained timm models with their Hub pages instead")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("datasets", help="list the datasets")
    p.set_defaults(func=_cmd_datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failed run, 2 bad arguments or files, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    tune_allocator()  # an application's process: keep freed tensor memory for reuse (vitviz/runtime.py)
    try:
        return int(args.func(args))
    except TrainingError as err:  # the run could not start or go on (e.g. a non-finite loss)
        print(f"vitviz {args.command}: error: {err}", file=sys.stderr)
        return 1
    except VitvizError as err:  # bad arguments or input files: unknown names, missing or damaged files
        print(f"vitviz {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitviz {args.command}: interrupted; a training run continues with --resume.", file=sys.stderr)
        return 130


def _version() -> str:
    from vitviz import __version__

    return f"vitviz {__version__}"


if __name__ == "__main__":
    sys.exit(main())
