"""The one registry of explanation methods: what each is called, takes, applies to and costs.

Every front end reads this module: ``explain()`` dispatches through it, the CLI builds its
``--method`` choices and help from it, the dashboard's labels and parameter widgets come from it,
and the tests walk it. A :class:`Method` names its runner as ``"module:function"`` and imports it on
first use, so reading the registry (CLI help, dashboard menus) imports no method code, and a method
whose optional package is missing is refused with the ``pip install`` that brings it.

A runner is ``run(method, adapter, x, params) -> MapResult``; ``params`` has every default filled in.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitviz.errors import ExplainError

if TYPE_CHECKING:  # reading the registry (CLI help, menus) imports no torch
    import torch

__all__ = ["CAM_EXTRA", "Cost", "CostContext", "MapResult", "Method", "get_method", "method_names", "register",
           "registry"]

# What to install for the CAM family (pytorch-grad-cam): the project extra, or the package itself.
CAM_EXTRA = 'pip install -e ".[explain]" (or pip install grad-cam)'


@dataclass(frozen=True)
class Cost:
    """Model passes one explanation costs, per image batch: full forwards and backwards.

    ``note`` says what the counts leave out when they depend on the model (e.g. ScoreCAM's one
    forward per channel of the target layer) or when a backward is partial (LeGrad's per-layer ones).
    """

    forward: int
    backward: int
    note: str = ""
    per_channel: bool = False  # one more forward per channel of a feature map the counts cannot know

    def __str__(self) -> str:
        text = f"{self.forward} forward + {self.backward} backward"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class CostContext:
    """What a cost may depend on besides the parameters: input size, token cell and depth, when known."""

    height: int = 224
    width: int = 224
    cell: tuple[int, int] | None = None  # pixels per token (transformers); None for CNNs
    depth: int | None = None  # attention layers


@dataclass
class MapResult:
    """What a runner returns: the raw map, the map to normalise, and what produced them."""

    raw: torch.Tensor  # (B, gh, gw) raw values on the method's grid
    shape: torch.Tensor  # (B, gh, gw) equal to ``raw`` up to a per-image constant (better conditioned)
    logits: torch.Tensor  # (B, classes), or (B, D) for a headless model
    target: torch.Tensor | None  # (B,) class explained; None for class-agnostic methods
    cell: tuple[int, int]  # pixels one grid cell covers


@dataclass(frozen=True)
class Method:
    """One explanation method as every front end shows it.

    ``models``: "transformer" (needs token attention) or "any" (also CNNs). ``needs_head``: needs
    class scores (every class-specific method does; EigenCAM needs a forward only). ``like``: an
    existing method whose adapter refusal also applies (the CAM family reads Grad-CAM's layer, LeGrad
    needs what Chefer needs: every layer's attention with gradients). ``requires``: (module to import,
    how to install it) for an optional package.
    """

    name: str
    label: str
    description: str
    params: Mapping[str, Any]
    runner: str  # "module:function"
    cost: Callable[[Mapping[str, Any], CostContext], Cost]
    models: str = "any"
    class_specific: bool = True
    needs_head: bool = True
    feature: bool = False  # describes the features, not a prediction: left out of faithfulness scores
    across_layers: bool = False  # multiplies attention across layers (the stagewise start_layer exception)
    like: str | None = None
    requires: tuple[str, str] | None = None
    check: str | None = None  # "module:function(adapter) -> reason or None": a method's own refusal
    reference: str = ""
    _fn: list[Callable[..., MapResult]] = field(default_factory=list, repr=False, compare=False)

    def available(self) -> bool:
        """Whether the optional package this method needs (if any) is installed."""
        return self.requires is None or importlib.util.find_spec(self.requires[0]) is not None

    def missing(self) -> str | None:
        """Why the method cannot run here (its package is missing), or None."""
        if self.available():
            return None
        return f"{self.name} needs the {self.requires[0]} package, which is not installed; {self.requires[1]}."

    def run(self, adapter: Any, x: torch.Tensor, params: dict[str, Any]) -> MapResult:
        """Run the method on an adapted model (its runner is imported on first use)."""
        why = self.missing()
        if why is not None:
            raise ExplainError(why)
        if not self._fn:
            module, _, name = self.runner.partition(":")
            self._fn.append(getattr(importlib.import_module(module), name))
        return self._fn[0](self.name, adapter, x, params)

    def own_refusal(self, adapter: Any) -> str | None:
        """The method's own reason to refuse ``adapter`` (its ``check``), or None."""
        if self.check is None or not self.available():
            return None
        module, _, name = self.check.partition(":")
        return getattr(importlib.import_module(module), name)(adapter)

    def cost_for(self, params: Mapping[str, Any] | None = None, ctx: CostContext | None = None) -> Cost:
        """Passes this method costs with ``params`` (defaults filled in) on inputs described by ``ctx``."""
        return self.cost({**self.params, **(params or {})}, ctx or CostContext())


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` (a later registration of the same name replaces it)."""
    _REGISTRY[method.name] = method
    return method


def registry() -> dict[str, Method]:
    """Every registered method by name, in registration order (the order menus show)."""
    _load_optional()
    return dict(_REGISTRY)


def method_names() -> tuple[str, ...]:
    return tuple(registry())


def get_method(name: str) -> Method:
    """The method called ``name``; ExplainError naming the choices for an unknown one."""
    methods = registry()
    if name not in methods:
        raise ExplainError(f"unknown method {name!r}; choose one of {', '.join(methods)}.")
    return methods[name]


# --- costs -------------------------------------------------------------------------------------------

def _fixed(forward: int, backward: int, note: str = "") -> Callable[[Mapping[str, Any], CostContext], Cost]:
    return lambda _p, _ctx: Cost(forward, backward, note)


def occlusion_window(p: Mapping[str, Any], ctx: CostContext) -> tuple[tuple[int, int], tuple[int, int]]:
    """(window, stride) in pixels: the token cell on a transformer (patch-aligned), else 1/8 of each side."""
    win = p.get("window")
    if win is None:
        win = ctx.cell if ctx.cell is not None else (max(1, ctx.height // 8), max(1, ctx.width // 8))
    win = (int(win), int(win)) if isinstance(win, int) else (int(win[0]), int(win[1]))
    stride = p.get("stride")
    stride = win if stride is None else ((int(stride), int(stride)) if isinstance(stride, int) else
                                         (int(stride[0]), int(stride[1])))
    return win, stride


def _occlusion_cost(p: Mapping[str, Any], ctx: CostContext) -> Cost:
    (wh, ww), (sh, sw) = occlusion_window(p, ctx)
    windows = (max(0, (ctx.height - wh) // sh) + 1) * (max(0, (ctx.width - ww) // sw) + 1)
    # the prediction, captum's unoccluded reference pass, then the occluded copies
    return Cost(2 + windows, 0, f"{windows} occluded copies, {int(p['batch'])} per call")


def _legrad_cost(p: Mapping[str, Any], ctx: CostContext) -> Cost:
    if not ctx.depth:
        return Cost(1, 0, "+1 partial backward per layer, through the head and that layer only")
    layers = ctx.depth - (int(p["start_layer"]) % ctx.depth)
    return Cost(1, layers, "partial backwards, through the head and one layer each")


# --- the methods ---------------------------------------------------------------------------------------

_API = "vitviz.explain.api:run_builtin"
_TARGET = {"target": None}

register(Method(
    "attention", "Raw attention", "One layer's attention from what the head reads (or a query patch) to every patch.",
    {"layer": -1, "head": None, "query": None}, _API, _fixed(1, 0), models="transformer", class_specific=False,
    needs_head=False))
register(Method(
    "rollout", "Attention rollout (Abnar & Zuidema 2020)",
    "Attention multiplied through the layers with the residual path as identity.",
    {"head_fusion": "mean", "discard_ratio": 0.0, "start_layer": 0}, _API, _fixed(1, 0), models="transformer",
    class_specific=False, needs_head=False, across_layers=True, reference="Abnar & Zuidema, ACL 2020"))
register(Method(
    "grad-rollout", "Gradient-weighted rollout",
    "Rollout of the head-mean of gradient x attention, clamped at 0 (vit-explain's grad rollout).",
    {**_TARGET, "discard_ratio": 0.0, "start_layer": 0}, _API, _fixed(1, 1), models="transformer",
    across_layers=True))
register(Method(
    "chefer", "Relevance (Chefer et al. 2021)",
    "Relevance propagated through attention weighted by its gradient, clamped per head.",
    {**_TARGET, "start_layer": 0}, _API, _fixed(1, 1), models="transformer", across_layers=True,
    reference="Chefer, Gur & Wolf, ICCV 2021"))
register(Method(
    "gradcam", "Grad-CAM (Selvaraju et al. 2017)",
    "Feature map weighted by its spatially averaged gradient (vitviz's own, same map as pytorch-grad-cam).",
    {**_TARGET, "layer": None}, _API, _fixed(1, 1), reference="Selvaraju et al., ICCV 2017"))
register(Method(
    "similarity", "Feature similarity to a patch",
    "Cosine similarity of every cell's last-layer features to one query cell's.",
    {"query": None}, _API, _fixed(1, 0), class_specific=False, needs_head=False, feature=True))

_LEGRAD = "vitviz.explain.legrad:run_legrad"
register(Method(
    "legrad", "LeGrad (Bousselham et al. 2024)",
    "Per layer, the gradient of the head's score read from that layer's tokens w.r.t. its attention; summed.",
    {**_TARGET, "start_layer": 0}, _LEGRAD, _legrad_cost, models="transformer", like="chefer",
    check="vitviz.explain.legrad:refusal",
    reference="Bousselham et al., arXiv:2404.03214 (2024)"))

_BASE = "vitviz.explain.baselines:run_baseline"
register(Method(
    "occlusion", "Occlusion (Zeiler & Fergus 2014)",
    "Drop in the class score when each window is set to the baseline; patch-aligned windows on transformers.",
    {**_TARGET, "window": None, "stride": None, "baseline": 0.0, "batch": 16}, _BASE, _occlusion_cost,
    requires=("captum", 'pip install captum (or pip install -e ".[explain]")'),
    reference="Zeiler & Fergus, ECCV 2014; captum Occlusion"))
register(Method(
    "rise", "RISE (Petsiuk et al. 2018)",
    "Random binary masks weighted by the class probability of the masked image.",
    {**_TARGET, "n_masks": 1000, "grid": 8, "p_keep": 0.5, "batch": 32, "seed": 0}, _BASE,
    lambda p, _ctx: Cost(1 + int(p["n_masks"]), 0, f"{int(p['batch'])} masks per call"),
    reference="Petsiuk, Das & Saenko, BMVC 2018"))
register(Method(
    "integrated-gradients", "Integrated Gradients (Sundararajan et al. 2017)",
    "Gradients averaged along the straight path from a baseline image to the input, times the difference.",
    {**_TARGET, "steps": 50, "baseline": 0.0, "batch": 16, "sign": "positive"}, _BASE,
    lambda p, _ctx: Cost(1 + int(p["steps"]), int(p["steps"]), f"{int(p['batch'])} steps per call"),
    requires=("captum", 'pip install captum (or pip install -e ".[explain]")'),
    reference="Sundararajan, Taly & Yan, ICML 2017; captum IntegratedGradients"))
register(Method(
    "smoothgrad", "SmoothGrad (Smilkov et al. 2017)",
    "Input gradients averaged over noisy copies of the image (noise as a fraction of its value range).",
    {**_TARGET, "samples": 25, "noise": 0.15, "sign": "absolute", "seed": 0}, _BASE,
    lambda p, _ctx: Cost(1 + int(p["samples"]), int(p["samples"])),
    requires=("captum", 'pip install captum (or pip install -e ".[explain]")'),
    reference="Smilkov et al., arXiv:1706.03825 (2017); captum NoiseTunnel"))

_CAM = "vitviz.explain.cam_family:run_cam"
_CAM_REQ = ("pytorch_grad_cam", CAM_EXTRA)
_CAM_PARAMS = {**_TARGET, "layer": None}
register(Method(
    "gradcam++", "Grad-CAM++ (Chattopadhay et al. 2018)",
    "Grad-CAM with channel weights from positive gradients and second-order terms (pytorch-grad-cam).",
    _CAM_PARAMS, _CAM, _fixed(1, 1), like="gradcam", requires=_CAM_REQ, reference="Chattopadhay et al., WACV 2018"))
register(Method(
    "hirescam", "HiResCAM (Draelos & Carin 2020)",
    "Activations times gradients element-wise, summed over channels (pytorch-grad-cam).",
    _CAM_PARAMS, _CAM, _fixed(1, 1), like="gradcam", requires=_CAM_REQ, reference="Draelos & Carin, 2020"))
register(Method(
    "scorecam", "Score-CAM (Wang et al. 2020)",
    "Channels weighted by the class score of the image masked by each channel's map (pytorch-grad-cam).",
    {**_CAM_PARAMS, "batch": 32}, _CAM,
    lambda p, _ctx: Cost(1, 0, f"+1 forward per channel of the target layer, {int(p['batch'])} per call",
                         per_channel=True),
    like="gradcam", requires=_CAM_REQ, reference="Wang et al., CVPR Workshops 2020"))
register(Method(
    "eigencam", "Eigen-CAM (Muhammad & Yeasin 2020)",
    "First principal component of the feature map; class-agnostic, no gradients (pytorch-grad-cam).",
    {"layer": None}, _CAM, _fixed(1, 0), like="gradcam", class_specific=False, needs_head=False,
    requires=_CAM_REQ, reference="Muhammad & Yeasin, IJCNN 2020"))
register(Method(
    "layercam", "LayerCAM (Jiang et al. 2021)",
    "Activations weighted element-wise by their positive gradients (pytorch-grad-cam).",
    _CAM_PARAMS, _CAM, _fixed(1, 1), like="gradcam", requires=_CAM_REQ, reference="Jiang et al., IEEE TIP 2021"))

_optional_loaded = False


def _load_optional() -> None:
    """Register AttnLRP when its module is there (it lives in its own file, imported only to run)."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    if importlib.util.find_spec("vitviz.explain.attnlrp") is None:
        return
    register(Method(
        "attnlrp", "AttnLRP (Achtibat et al. 2024)",
        "Layer-wise relevance propagation with the AttnLRP rules for LayerNorm, softmax, matmul and GELU.",
        {**_TARGET, "per": "token", "gamma": 0.0, "conv_gamma": 0.0}, "vitviz.explain.registry:run_attnlrp",
        _fixed(1, 1), models="transformer",
        check="vitviz.explain.attnlrp:refusal", reference="Achtibat et al., ICML 2024"))


def run_attnlrp(_method: str, adapter: Any, x: torch.Tensor, p: dict[str, Any]) -> MapResult:
    """The registry's runner for AttnLRP (vitviz.explain.attnlrp): token-cell or pixel relevance, signed."""
    from vitviz.explain.attnlrp import attnlrp_details

    if p["per"] not in ("token", "pixel"):
        raise ExplainError(f"per must be 'token' or 'pixel', got {p['per']!r}.")
    res = attnlrp_details(adapter.model, x, p["target"], gamma=p["gamma"], conv_gamma=p["conv_gamma"])
    if p["per"] == "pixel":
        return MapResult(res.pixels, res.pixels, res.logits, res.target, (1, 1))
    return MapResult(res.grid, res.grid, res.logits, res.target, res.cell)
