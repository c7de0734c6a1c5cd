"""The model-agnostic baselines every explanation paper compares against, on any model (CNNs too).

* occlusion: captum's ``Occlusion``; on a transformer the windows are its token cells (stride = window),
  so each occluded window is exactly one patch and the map lies on the token grid;
* RISE (Petsiuk et al. 2018): ours, since captum has none; seeded masks, so a batch equals its singles;
* Integrated Gradients: captum's ``IntegratedGradients`` (Gauss-Legendre steps, as captum's default);
* SmoothGrad: captum's ``NoiseTunnel`` over ``Saliency``; the noise is a fraction of each image's value
  range, as in Smilkov et al. 2017, and seeded.

Each wrapper fixes the parameters the registry shows (:mod:`vitviz.explain.registry`) and returns the
map on its own grid: the window grid for non-overlapping occlusion, pixels otherwise. Pixels left out
by the input baseline are 0 in the *normalised* input space (the dataset mean colour).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vitviz.errors import ExplainError
from vitviz.explain.adapters import Adapter
from vitviz.explain.layout import resolve_target
from vitviz.explain.registry import CostContext, MapResult, occlusion_window

__all__ = ["integrated_gradients", "occlusion", "rise", "rise_masks", "run_baseline", "smoothgrad"]

SIGNS = ("positive", "absolute", "all")


def run_baseline(method: str, adapter: Adapter, x: torch.Tensor, p: dict[str, Any]) -> MapResult:
    """The registry's runner for occlusion, rise, integrated-gradients and smoothgrad."""
    fn = {"occlusion": occlusion, "rise": rise, "integrated-gradients": integrated_gradients,
          "smoothgrad": smoothgrad}[method]
    return fn(adapter, x, **p)


def _forward(adapter: Adapter) -> Callable[[torch.Tensor], torch.Tensor]:
    model = adapter.model

    def f(inp: torch.Tensor) -> torch.Tensor:
        out = model(inp)
        if isinstance(out, (tuple, list)):
            raise ExplainError(f"{type(model).__name__} returned {len(out)} outputs; call model.eval() first.")
        return out  # (B, classes)

    return f


def _predict(adapter: Adapter, x: torch.Tensor, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, classes) of one forward pass and the class to explain per image (B,)."""
    with torch.no_grad():
        logits = _forward(adapter)(x)
    return logits, resolve_target(target, logits)


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ExplainError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


def _check_sign(sign: str) -> None:
    if sign not in SIGNS:
        raise ExplainError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}.")


def _pixels(attr: torch.Tensor, sign: str) -> torch.Tensor:
    """Per-pixel map (B, H, W) from attributions (B, C, H, W): channels summed (of |a| for "absolute")."""
    if sign == "absolute":
        return attr.abs().sum(dim=1)  # (B, H, W)
    summed = attr.sum(dim=1)  # (B, H, W)
    return summed.clamp(min=0) if sign == "positive" else summed


def _baseline(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExplainError(f"baseline must be a number (the input value of a removed pixel), got {value!r}.")
    return float(value)


# --- occlusion -----------------------------------------------------------------------------------------

def occlusion(adapter: Adapter, x: torch.Tensor, target: Any = None, window: Any = None, stride: Any = None,
              baseline: float = 0.0, batch: int = 16) -> MapResult:
    """Captum occlusion: the class score's drop when each window is set to ``baseline``.

    ``window`` / ``stride``: pixels (an int or (rows, cols)); default: the token cell on a
    transformer (one window per patch), 1/8 of each side on a CNN; stride defaults to the window.
    With stride = window the map is returned on the window grid (cell = window).
    """
    from captum.attr import Occlusion

    h, w = int(x.shape[-2]), int(x.shape[-1])
    cell = adapter.final_tokens(h, w).cell if adapter.kind == "transformer" else None
    try:
        (wh, ww), (sh, sw) = occlusion_window({"window": window, "stride": stride}, CostContext(h, w, cell))
    except (TypeError, ValueError, IndexError) as err:
        raise ExplainError(f"window and stride must be pixel counts (int or (rows, cols)), got {window!r}, "
                           f"{stride!r}.") from err
    if not (0 < wh <= h and 0 < ww <= w and sh > 0 and sw > 0):
        raise ExplainError(f"occlusion window {wh}x{ww} (stride {sh}x{sw}) must be positive and fit the {h}x{w} "
                           "image.")
    batch = _positive_int("batch", batch)
    logits, t = _predict(adapter, x, target)
    c = x.shape[1]
    with torch.no_grad():
        attr = Occlusion(_forward(adapter)).attribute(
            x.detach(), sliding_window_shapes=(c, wh, ww), strides=(c, sh, sw), baselines=_baseline(baseline),
            target=t, perturbations_per_eval=batch)  # (B, C, H, W): each pixel, the mean drop of its windows
    if (wh, ww) == (sh, sw):
        nh, nw = (h - wh) // sh + 1, (w - ww) // sw + 1
        grid = attr[:, 0, : nh * sh : sh, : nw * sw : sw]  # (B, nh, nw): one value per window
        return MapResult(grid, grid, logits, t, (wh, ww))
    pixels = attr[:, 0]  # (B, H, W): every channel of a window holds the same drop
    return MapResult(pixels, pixels, logits, t, (1, 1))


# --- RISE ----------------------------------------------------------------------------------------------

def rise_masks(n: int, size: tuple[int, int], grid: int, p_keep: float, generator: torch.Generator,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` RISE masks (n, H, W) in [0, 1]: a random ``grid`` x ``grid`` binary grid (cells kept with
    ``p_keep``), upsampled bilinearly to (grid + 1) cells and cropped at a random sub-cell shift."""
    h, w = size
    ch, cw = -(-h // grid), -(-w // grid)  # cell size, rounded up
    cells = (torch.rand(n, 1, grid, grid, generator=generator) < p_keep).float()  # (n, 1, s, s)
    up = F.interpolate(cells, size=((grid + 1) * ch, (grid + 1) * cw), mode="bilinear",
                       align_corners=False)  # (n, 1, (s+1)ch, (s+1)cw)
    dy = torch.randint(0, ch, (n,), generator=generator)
    dx = torch.randint(0, cw, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(h)[None]  # (n, H)
    cols = dx[:, None] + torch.arange(w)[None]  # (n, W)
    up = up[:, 0]  # (n, (s+1)ch, (s+1)cw)
    masks = up[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, H, W)
    return masks.clamp_(0.0, 1.0).to(device)  # interpolation rounds 1 up to 1 + 1e-7


def rise(adapter: Adapter, x: torch.Tensor, target: Any = None, n_masks: int = 1000, grid: int = 8,
         p_keep: float = 0.5, batch: int = 32, seed: int = 0) -> MapResult:
    """RISE: ``sum_i P(class | x * M_i) M_i / (n_masks * p_keep)`` over seeded random masks (pixels, (B, H, W))."""
    n_masks = _positive_int("n_masks", n_masks)
    grid = _positive_int("grid", grid)
    batch = _positive_int("batch", batch)
    if isinstance(p_keep, bool) or not isinstance(p_keep, (int, float)) or not 0.0 < float(p_keep) < 1.0:
        raise ExplainError(f"p_keep must be a probability in (0, 1), got {p_keep!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ExplainError(f"seed must be an integer, got {seed!r}.")
    logits, t = _predict(adapter, x, target)
    f = _forward(adapter)
    b, _, h, w = x.shape
    gen = torch.Generator().manual_seed(seed)
    sal = x.new_zeros(b, h, w, dtype=torch.float32)  # (B, H, W)
    with torch.no_grad():
        for start in range(0, n_masks, batch):
            m = rise_masks(min(batch, n_masks - start), (h, w), grid, float(p_keep), gen, x.device)  # (k, H, W)
            k = m.shape[0]
            masked = (x[:, None] * m[None, :, None]).reshape(b * k, *x.shape[1:])  # (B*k, C, H, W)
            probs = f(masked).float().softmax(dim=-1).reshape(b, k, -1)  # (B, k, classes)
            score = probs.gather(2, t[:, None, None].expand(b, k, 1))[..., 0]  # (B, k)
            sal += torch.einsum("bk,khw->bhw", score, m.float())
    sal = sal / (n_masks * float(p_keep))
    return MapResult(sal, sal, logits, t, (1, 1))


# --- gradients -----------------------------------------------------------------------------------------

def integrated_gradients(adapter: Adapter, x: torch.Tensor, target: Any = None, steps: int = 50,
                         baseline: float = 0.0, batch: int = 16, sign: str = "positive") -> MapResult:
    """Captum Integrated Gradients from a constant ``baseline`` image; channels summed per pixel (B, H, W)."""
    from captum.attr import IntegratedGradients

    steps = _positive_int("steps", steps, 2)
    batch = _positive_int("batch", batch)
    _check_sign(sign)
    logits, t = _predict(adapter, x, target)
    with torch.enable_grad():
        attr = IntegratedGradients(_forward(adapter)).attribute(
            x.detach(), baselines=_baseline(baseline), target=t, n_steps=steps,
            internal_batch_size=batch * x.shape[0])  # (B, C, H, W)
    m = _pixels(attr.detach(), sign)
    return MapResult(m, m, logits, t, (1, 1))


def smoothgrad(adapter: Adapter, x: torch.Tensor, target: Any = None, samples: int = 25, noise: float = 0.15,
               sign: str = "absolute", seed: int = 0) -> MapResult:
    """Captum SmoothGrad: gradients of the class score averaged over ``samples`` noisy copies, per pixel (B, H, W).

    The noise's standard deviation is ``noise`` times each image's value range (max - min), so every
    image of a batch is explained on its own (one NoiseTunnel call each, with the same seed).
    """
    from captum.attr import NoiseTunnel, Saliency

    samples = _positive_int("samples", samples)
    _check_sign(sign)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or float(noise) < 0:
        raise ExplainError(f"noise must be a non-negative fraction of the image's value range, got {noise!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ExplainError(f"seed must be an integer, got {seed!r}.")
    logits, t = _predict(adapter, x, target)
    tunnel = NoiseTunnel(Saliency(_forward(adapter)))
    maps = []
    devices = [x.device] if x.device.type == "cuda" else []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].detach()
        stdev = float(noise) * float(xi.max() - xi.min())
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(seed)
            attr = tunnel.attribute(xi, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev,
                                    target=t[i:i + 1], abs=False)  # (1, C, H, W): mean raw gradient
        maps.append(_pixels(attr.detach(), sign))
    m = torch.cat(maps)  # (B, H, W)
    return MapResult(m, m, logits, t, (1, 1))
