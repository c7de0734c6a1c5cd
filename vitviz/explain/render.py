"""Saliency overlays as PNG without plotly or matplotlib: colour lookup tables + PIL blending.

The CLI writes these files and the dashboard offers them for download. The colour maps are
piecewise-linear between anchor colours; the figures in :mod:`vitviz.plots.explain` pass the same
anchors to plotly (:func:`plotly_colorscale`), so a PNG looks like the figure on screen.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vitviz.arrays import to_numpy
from vitviz.atomic import write_bytes_atomic
from vitviz.errors import ExplainError

__all__ = ["COLORMAPS", "apply_colormap", "colormap_lut", "overlay_png", "plotly_colorscale", "render_overlay",
           "save_overlay_png"]

# name -> [(position in [0, 1], (r, g, b))]
COLORMAPS: dict[str, list[tuple[float, tuple[int, int, int]]]] = {
    "jet": [(0.0, (0, 0, 131)), (0.125, (0, 60, 170)), (0.375, (5, 255, 255)), (0.625, (255, 255, 0)),
            (0.875, (250, 0, 0)), (1.0, (128, 0, 0))],
    "viridis": [(i / 9, c) for i, c in enumerate([
        (0x44, 0x01, 0x54), (0x48, 0x28, 0x78), (0x3E, 0x49, 0x89), (0x31, 0x68, 0x8E), (0x26, 0x82, 0x8E),
        (0x1F, 0x9E, 0x89), (0x35, 0xB7, 0x79), (0x6E, 0xCE, 0x58), (0xB5, 0xDE, 0x2B), (0xFD, 0xE7, 0x25)])],
    "inferno": [(i / 9, c) for i, c in enumerate([
        (0x00, 0x00, 0x04), (0x1B, 0x0C, 0x41), (0x4A, 0x0C, 0x6B), (0x78, 0x1C, 0x6D), (0xA5, 0x2C, 0x60),
        (0xCF, 0x44, 0x46), (0xED, 0x69, 0x25), (0xFB, 0x9B, 0x06), (0xF7, 0xD1, 0x3D), (0xFC, 0xFF, 0xA4)])],
    "gray": [(0.0, (0, 0, 0)), (1.0, (255, 255, 255))],
}


def _anchors(name: str) -> list[tuple[float, tuple[int, int, int]]]:
    key = str(name).lower()
    if key not in COLORMAPS:
        raise ExplainError(f"unknown colour map {name!r}; choose one of {', '.join(COLORMAPS)}.")
    return COLORMAPS[key]


def colormap_lut(name: str = "jet", n: int = 256) -> np.ndarray:
    """Lookup table (n, 3) uint8 of a colour map, linear between its anchors."""
    anchors = _anchors(name)
    pos = np.array([a[0] for a in anchors])
    rgb = np.array([a[1] for a in anchors], dtype=np.float64)  # (K, 3)
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, pos, rgb[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def plotly_colorscale(name: str) -> list[list]:
    """The same colour map as a plotly colorscale ``[[pos, "rgb(r,g,b)"], ...]``."""
    return [[p, f"rgb({r},{g},{b})"] for p, (r, g, b) in _anchors(name)]


def apply_colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """Colour a map (H, W) with values in [0, 1] (clipped; NaN -> 0): (H, W, 3) uint8."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    lut = colormap_lut(name)
    idx = np.clip(np.round(v * (len(lut) - 1)), 0, len(lut) - 1).astype(np.intp)
    return lut[idx]


def _resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    if values.shape == (height, width):
        return values
    img = Image.fromarray(values.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch a pixel outside it (4-neighbourhood)."""
    pad = np.pad(mask, 1, mode="constant", constant_values=False)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return mask & ~inner


def render_overlay(image: np.ndarray, saliency: np.ndarray, opacity: float = 0.5, colormap: str = "jet",
                   mask: np.ndarray | None = None, point: tuple[int, int] | None = None,
                   normalize: bool = True) -> np.ndarray:
    """Blend a coloured saliency map over an image: (H, W, 3) uint8.

    ``image``: (H, W, 3) uint8 (or (H, W) grey). ``saliency``: (h, w), resized bilinearly to the
    image when its size differs; min-max normalised unless ``normalize=False`` (then clipped to
    [0, 1]). ``mask``: (H, W) bool drawn as a white outline. ``point``: (row, col) marked with a
    small cross (e.g. the pointing-game maximum).
    """
    img = to_numpy(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ExplainError(f"image must be (H, W, 3) uint8, got shape {img.shape}.")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if not 0.0 <= opacity <= 1.0:
        raise ExplainError(f"opacity must be in [0, 1], got {opacity}.")
    h, w = img.shape[:2]
    sal = to_numpy(saliency).astype(np.float32)
    if sal.ndim != 2:
        raise ExplainError(f"saliency must be one map (H, W), got shape {sal.shape}; index the batch first.")
    sal = _resize_map(np.nan_to_num(sal), h, w)
    if normalize:
        lo, hi = float(sal.min()), float(sal.max())
        sal = (sal - lo) / (hi - lo) if hi > lo else np.zeros_like(sal)
    colour = apply_colormap(np.clip(sal, 0.0, 1.0), colormap).astype(np.float32)
    out = (1.0 - opacity) * img.astype(np.float32) + opacity * colour
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if mask is not None:
        m = to_numpy(mask).astype(bool)
        if m.shape != (h, w):
            raise ExplainError(f"mask must be (H, W) = ({h}, {w}) like the image, got {m.shape}.")
        out[_outline(m)] = 255
    if point is not None:
        r, c = int(point[0]), int(point[1])
        arm = max(1, min(h, w) // 32)
        for dr in range(-arm, arm + 1):
            for rr, cc in ((r + dr, c), (r, c + dr)):
                if 0 <= rr < h and 0 <= cc < w:
                    out[rr, cc] = (255, 255, 255)
    return out


def overlay_png(image: np.ndarray, saliency: np.ndarray, opacity: float = 0.5, colormap: str = "jet",
                mask: np.ndarray | None = None, point: tuple[int, int] | None = None, scale: int = 1) -> bytes:
    """:func:`render_overlay` encoded as PNG bytes; ``scale`` enlarges it (nearest) for small images."""
    rgb = render_overlay(image, saliency, opacity, colormap, mask, point)
    pil = Image.fromarray(rgb)
    if scale > 1:
        pil = pil.resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def save_overlay_png(path: str | os.PathLike, image: np.ndarray, saliency: np.ndarray, **kwargs: object) -> Path:
    """Write :func:`overlay_png` to ``path`` (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, overlay_png(image, saliency, **kwargs))
    return path
