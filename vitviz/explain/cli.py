"""``vitviz explain``: a saliency overlay PNG and the raw map (.npy) for one image, plus top-5 predictions
(for a CLIP, every prompt's probability; without ``--prompt`` a CLIP scores
:data:`~vitviz.models.clip.DEFAULT_PROMPTS`).

    vitviz explain IMAGE (--checkpoint PATH | --model timm:NAME | hf:ID | open_clip:ARCH
        [--pretrained-file F | --pretrained TAG | --random-weights] [--prompt TEXT ...]) --method M
        [--layer L --head H --fusion F --discard-ratio R --start-layer S --target C --query ROW,COL]
        --out map.png

Layers count from 1, as in the dashboard (1 = first, -1 = last); the Python API they are handed to
counts from 0, as Python does, and this module converts.

The lead wires it into ``vitviz/cli.py`` with ``add_parser(subparsers)`` and ``run(args)``; it also
runs alone as ``python -m vitviz.explain.cli``. Bad arguments print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitviz.atomic import atomic_path
from vitviz.errors import ExplainError, VitvizError, WeightsUnavailableError
from vitviz.explain.registry import method_names, registry

__all__ = ["add_parser", "build_parser", "main", "run"]

_METHODS = method_names()  # = vitviz.explain.METHODS, read from the one registry
# Flags with a name of their own; every other method parameter goes through --param KEY=VALUE.
_FLAGS = {"layer": "--layer", "head": "--head", "head_fusion": "--fusion", "discard_ratio": "--discard-ratio",
          "start_layer": "--start-layer", "target": "--target", "query": "--query"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``explain`` subcommand to ``subparsers`` (its handler is :func:`run`)."""
    p = subparsers.add_parser(
        "explain", help="saliency map of one image (overlay PNG + raw .npy) and top-5 predictions",
        description="Explain one image's prediction: writes an overlay PNG and the map as .npy next to it.",
    )
    _configure(p)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for ``python -m vitviz.explain.cli``."""
    p = argparse.ArgumentParser(prog="vitviz explain",
                                description="Explain one image's prediction: overlay PNG + raw map .npy.")
    _configure(p)
    return p


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (PNG, JPEG, WebP, BMP, GIF, TIFF)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a vitviz checkpoint (.safetensors)")
    src.add_argument("--model", metavar="timm:NAME|hf:ID|open_clip:ARCH",
                     help="any timm model, e.g. timm:vit_base_patch16_224.augreg2_in21k_ft_in1k (pretrained "
                          "weights from --pretrained-file, the local cache or the Hub; `vitviz models --pretrained` "
                          "lists some); a Hugging Face model, hf:google/vit-base-patch16-224 or hf:FOLDER; or a "
                          "CLIP, open_clip:ViT-B-32 --pretrained openai --prompt 'a dog' --prompt 'a cat'")
    p.add_argument("--pretrained-file", metavar="F",
                   help="safetensors weights for --model timm:NAME or open_clip:ARCH")
    p.add_argument("--pretrained", metavar="TAG", help="open_clip weights tag, e.g. openai or laion2b_s34b_b79k")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a CLIP class, as text (repeat for several); --target may name one")
    p.add_argument("--random-weights", action="store_true",
                   help="--model with random weights: explore the architecture, download nothing")
    p.add_argument("--method", default="rollout", choices=_METHODS, metavar="M", help=_method_help())
    p.add_argument("--layer", type=int,
                   help="attention: layer, counted from 1 (default -1, the last); gradcam: ViT block whose tokens "
                        "to use, counted from 1")
    p.add_argument("--head", help="attention: head index, or mean/max/min (default: mean)")
    p.add_argument("--fusion", choices=("mean", "max", "min"), help="rollout: head fusion (default: mean)")
    p.add_argument("--discard-ratio", type=float, help="rollout, grad-rollout: weakest weights dropped, in [0, 1)")
    p.add_argument("--start-layer", type=int,
                   help="rollout, grad-rollout, chefer, legrad: first layer used, counted from 1 (default 1; "
                        "-1 is the last)")
    p.add_argument("--target", help="class index or name to explain (default: the predicted class)")
    p.add_argument("--query", metavar="ROW,COL",
                   help="attention: query patch (default: what the head reads); similarity: the cell to compare")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other parameter of the method, e.g. n_masks=500 (rise), steps=32 "
                        "(integrated-gradients), window=16 (occlusion); repeat for several")
    p.add_argument("--out", required=True, metavar="PNG", help="overlay PNG to write; the map goes to .npy beside it")
    p.add_argument("--opacity", type=float, default=0.5, help="heatmap opacity in [0, 1] (default 0.5)")
    p.add_argument("--colormap", default="jet", help="jet, viridis, inferno or gray (default: jet)")
    p.add_argument("--scale", type=int, help="enlarge the PNG by this factor (default: to about 224 px)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.set_defaults(func=run)


def _method_help() -> str:
    """The registry's methods with their labels; parameters and costs are in vitviz.explain.registry."""
    listed = "; ".join(f"{name} ({m.label})" for name, m in registry().items())
    return f"explanation method (default: rollout): {listed}"


def run(args: argparse.Namespace) -> int:
    """Run ``vitviz explain``; 0 on success, 2 (with one line on stderr) for bad arguments or inputs."""
    try:
        return _run(args)
    except VitvizError as err:
        print(f"vitviz explain: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"vitviz explain: error: cannot write output: {err}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m vitviz.explain.cli``."""
    return run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    import torch

    from vitviz.explain import METHOD_PARAMS, explain_details
    from vitviz.explain.render import save_overlay_png
    from vitviz.images import fit_image, open_image, preprocess

    params = _method_params(args, METHOD_PARAMS[args.method])
    if not 0.0 <= args.opacity <= 1.0:
        raise ExplainError(f"--opacity must be in [0, 1], got {args.opacity}.")
    if args.scale is not None and args.scale < 1:
        raise ExplainError(f"--scale must be a positive integer, got {args.scale}.")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ExplainError(f"--out must name a .png file, got {args.out!r}.")
    image = open_image(args.image)
    model, size, mean, std, names = _load_model(args)
    _layers_from_zero(params, model)
    if "target" in params and params["target"] is not None:
        params["target"] = _class_index(params["target"], names)
    device = next(model.parameters()).device
    fitted = np.asarray(fit_image(image, size))  # (S, S, 3) uint8: what the model sees
    x = preprocess(fitted, size, mean=mean, std=std).to(device)  # (1, 3, S, S)
    result = explain_details(model, x, args.method, **params)
    saliency = result.maps[0].cpu().numpy().astype(np.float32)  # (S, S) in [0, 1]
    scale = args.scale or max(1, round(224 / size))
    save_overlay_png(out, fitted, saliency, opacity=args.opacity, colormap=args.colormap, scale=scale)
    npy = out.with_suffix(".npy")
    with atomic_path(npy) as tmp, open(tmp, "wb") as fp:  # np.save would add .npy to a temporary name
        np.save(fp, saliency, allow_pickle=False)
    from vitviz.explain import adapter_for

    if adapter_for(model).has_head:
        from vitviz.models.clip import PromptClassifier

        # prompts are few (at most MAX_PROMPTS) and typed by the user: show every one, not a top 5
        _print_top5(torch.softmax(result.logits[0].float(), dim=-1).cpu(), names, result.target,
                    every=isinstance(model, PromptClassifier))
    else:
        print("this model has no classifier head (it returns features): no prediction to show")
    print(f"wrote {out} (overlay, {args.method}) and {npy} (map {saliency.shape[0]}x{saliency.shape[1]}, "
          "float32 in [0, 1])")
    return 0


def _method_params(args: argparse.Namespace, accepted: dict[str, Any]) -> dict[str, Any]:
    """Parameters for the method from the flags given; a flag the method does not take is an error."""
    given = {
        "layer": args.layer,
        "head": _head(args.head),
        "head_fusion": args.fusion,
        "discard_ratio": args.discard_ratio,
        "start_layer": args.start_layer,
        "target": args.target,
        "query": _query(args.query),
    }
    params = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in accepted:
            takes = ", ".join(_FLAGS.get(k, f"--param {k}=...") for k in accepted) or "no options"
            raise ExplainError(f"{_FLAGS.get(key, key)} does not apply to --method {args.method} (it takes {takes}).")
        params[key] = value
    for item in getattr(args, "param", None) or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ExplainError(f"--param takes KEY=VALUE, got {item!r}.")
        if key not in accepted:
            raise ExplainError(f"--method {args.method} takes no parameter {key!r}; it takes "
                               f"{', '.join(accepted) or 'no parameters'}.")
        if key in _FLAGS:
            raise ExplainError(f"give {key} with {_FLAGS[key]}, not --param.")
        params[key] = _literal(text.strip())
    return params


def _layers_from_zero(params: dict[str, Any], model: Any) -> None:
    """Turn the flags' layer numbers (1 = first, -1 = last) into the API's indices (0 = first), in place."""
    from vitviz.explain import adapter_for, has_attention

    depth = None
    with contextlib.suppress(VitvizError):  # no depth to check against: the API checks the index
        depth = adapter_for(model).depth() if has_attention(model) else None
    for key in ("layer", "start_layer"):
        value = params.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        flag = _FLAGS[key]
        if value == 0:
            raise ExplainError(f"{flag} counts layers from 1 (1 is the first, -1 the last); 0 is not a layer.")
        if depth is not None and not (1 <= value <= depth or -depth <= value <= -1):
            raise ExplainError(f"{flag} {value} is out of range: this model has {depth} layers (use 1..{depth}, or "
                               f"-1 for the last down to -{depth} for the first).")
        params[key] = value - 1 if value > 0 else value


def _literal(text: str) -> Any:
    """A --param value: a Python literal (3, 0.5, (16, 16), None, 'pos') or else the text itself."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _head(value: str | None) -> int | str | None:
    if value is None:
        return None
    if value in ("mean", "max", "min"):
        return value
    try:
        return int(value)
    except ValueError as err:
        raise ExplainError(f"--head must be a head index or mean/max/min, got {value!r}.") from err


def _query(value: str | None) -> int | tuple[int, int] | None:
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.split(",")]
    except ValueError as err:
        raise ExplainError(f"--query must be ROW,COL (or a flat patch index), got {value!r}.") from err
    if len(parts) == 1:
        return parts[0]
    if len(parts) != 2:
        raise ExplainError(f"--query must be ROW,COL (or a flat patch index), got {value!r}.")
    return parts[0], parts[1]


def _class_index(value: str, names: list[str] | None) -> int:
    try:
        return int(value)
    except ValueError:
        pass
    if names and value in names:
        return names.index(value)
    known = f" known classes: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}" if names else ""
    raise ExplainError(f"--target {value!r} is neither a class index nor a class name of this model.{known}")


def _load_model(args: argparse.Namespace):
    """(model in eval mode, input size, mean, std, class names or None)."""
    if args.checkpoint:
        if args.pretrained_file or args.random_weights:
            flag = "--pretrained-file" if args.pretrained_file else "--random-weights"
            raise ExplainError(f"{flag} goes with --model timm:NAME, not with --checkpoint.")
        from vitviz.checkpoint import load_checkpoint

        model, meta = load_checkpoint(args.checkpoint, args.device)
        return model, meta.img_size, meta.mean, meta.std, meta.class_names
    import vitviz
    from vitviz.models.timm_interop import timm_preprocessing

    name = args.model
    if args.random_weights and (args.pretrained_file or args.pretrained):
        flag = "--pretrained-file" if args.pretrained_file else "--pretrained"
        raise ExplainError(f"--random-weights and {flag} contradict each other; give one.")
    if name.startswith(("hf:", "open_clip:")):
        return _load_other(args, name)
    if args.prompt or args.pretrained:
        flag = "--prompt" if args.prompt else "--pretrained"
        raise ExplainError(f"{flag} goes with a CLIP model (--model open_clip:ARCH or an hf: CLIP), not {name}.")
    if not name.startswith("timm:"):
        raise ExplainError(
            f"--model {name!r}: give a timm model as timm:NAME (e.g. timm:vit_base_patch16_224), a Hugging Face "
            "model as hf:ID or hf:FOLDER, a CLIP as open_clip:ARCH, or a trained vitviz model with --checkpoint PATH."
        )
    bare = name.removeprefix("timm:")
    try:
        model = vitviz.create_model(name, pretrained=not args.random_weights and args.pretrained_file is None,
                                    pretrained_file=args.pretrained_file,
                                    progress=lambda msg: print(msg, file=sys.stderr))
    except WeightsUnavailableError as err:
        from vitviz.models.pretrained import weights_advice

        raise WeightsUnavailableError(
            f"pretrained weights for {bare} are not here and cannot be downloaded now. "
            f"{weights_advice(bare, 'cli')} Or pass --random-weights to explore the architecture.",
            model_name=bare, hub_id=getattr(err, "hub_id", None)) from err
    pre = timm_preprocessing(bare)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    names = None
    if getattr(model, "num_classes", 0) == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            names = [info.index_to_description(i) for i in range(1000)]
        except Exception:  # class names are a nicety; indices still work
            names = None
    img_size = getattr(getattr(model, "vit_config", None), "img_size", None) or pre["img_size"]
    return model, img_size, pre["mean"], pre["std"], names


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_other(args: argparse.Namespace, name: str):
    """``hf:`` and ``open_clip:`` models: (model, input size, mean, std, class names or prompts)."""
    import vitviz

    clip = name.startswith("open_clip:")
    if args.pretrained and not clip:
        raise ExplainError("--pretrained TAG is for open_clip:ARCH; an hf: model loads its own weights.")
    if args.pretrained_file and not clip:
        raise ExplainError("--pretrained-file is for timm: and open_clip: models; give the hf: folder instead.")
    if clip and not (args.pretrained or args.pretrained_file or args.random_weights):
        raise ExplainError(f"{name} needs weights: --pretrained TAG (e.g. openai), --pretrained-file F, or "
                           "--random-weights to explore the architecture.")
    kwargs: dict[str, Any] = {"prompts": args.prompt, "progress": lambda msg: print(msg, file=sys.stderr)}
    if clip:
        kwargs.update(pretrained=args.pretrained, pretrained_file=args.pretrained_file)
    else:
        kwargs["pretrained"] = not args.random_weights
    try:
        model = vitviz.create_model(name, **kwargs)
    except WeightsUnavailableError as err:
        raise _offline(args, name, err) from err
    if not args.prompt:
        from vitviz.models.clip import DEFAULT_PROMPTS
        from vitviz.models.hf import is_dual, with_prompts

        if clip or is_dual(model):  # as open_clip: a CLIP without --prompt scores the default prompts
            print(f"no --prompt given: scoring the default prompts ({'; '.join(DEFAULT_PROMPTS)}); pass --prompt TEXT "
                  "(repeat it) for your own classes", file=sys.stderr)
            if not clip:
                model = with_prompts(model, DEFAULT_PROMPTS)
    model = model.to(_device(args.device)).eval()
    pre = model.preprocessing
    names = list(model.class_names) or None
    return model, pre["img_size"], pre["mean"], pre["std"], names


def _offline(args: argparse.Namespace, name: str, err: WeightsUnavailableError) -> WeightsUnavailableError:
    """The offline error of an hf: or open_clip: model, with only the ways out that work from here."""
    if name.startswith("open_clip:"):  # the architecture ships with open_clip: random weights always build
        from vitviz.models.clip import open_clip_advice

        advice = open_clip_advice(name.removeprefix("open_clip:"), args.pretrained or "", "cli")
        return WeightsUnavailableError(f"{name}: the weights are not here and cannot be downloaded now. {advice} "
                                       "Or pass --random-weights to explore the architecture.",
                                       model_name=name, hub_id=getattr(err, "hub_id", None))
    from vitviz.models.hf import config_cached, hf_advice

    source = name.removeprefix("hf:")
    advice = hf_advice(source, "cli")
    if args.random_weights:  # a Hub id's architecture is its config.json, which is not here either
        what = "even random weights need its config.json, which is not in the local Hugging Face cache"
    else:
        what = "the model is not in the local Hugging Face cache"
        if config_cached(source):  # only the weights are missing: its architecture can still be explored
            advice += " Or pass --random-weights to explore the architecture (its config is cached here)."
    return WeightsUnavailableError(f"{name}: {what}, and the Hub cannot be reached. {advice}",
                                   model_name=name, hub_id=getattr(err, "hub_id", None))


def _print_top5(probs, names: list[str] | None, target, every: bool = False) -> None:
    """The top-5 classes with their probabilities; ``every``: all of them, by probability (a CLIP's prompts)."""
    k = probs.numel() if every else min(5, probs.numel())
    top = probs.topk(k)
    print("prompt probabilities:" if every else "top-5 predictions:")
    for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
        label = names[i] if names and i < len(names) else f"class {i}"
        print(f"  {rank}. {label:<30} {p:.4f}  (index {i})")
    if target is not None:
        t = int(target[0])
        label = names[t] if names and t < len(names) else f"class {t}"
        print(f"explained class: {label} (index {t})")


if __name__ == "__main__":
    sys.exit(main())
