"""A procedural, seeded colour dataset whose every image carries its object's pixel mask.

One target shape per scene (a class from :data:`SHAPE_CLASSES`) at a random position, size,
rotation and colour, on a textured background with clutter (thin lines, small dots) that carries no
class evidence. The mask is the ground truth for explanation checks (pointing game: does the
maximum of a saliency map fall inside the object?), so:

* the mask is exactly the pixels at least half covered by the object (2x2 supersampling), and the
  object is painted last, so nothing covers it;
* clutter is kept out of a disc around the object (its bounding circle plus a margin), so no
  clutter pixel touches the object or its mask;
* the object is large (bounding-circle diameter 30-60 % of the side) and its colour differs from the
  background's in luminance by at least :data:`MIN_LUMA_CONTRAST`; clutter is small and thin.

Rendering is vectorised numpy: pixel centres are mapped into each object's own frame (unit bounding
circle) and tested against the class's implicit shape, a few hundred scenes at a time.
"""

from __future__ import annotations

import numpy as np

from vitviz.errors import ConfigError

__all__ = ["MASK_AREA_RANGE", "MIN_LUMA_CONTRAST", "SHAPE_CLASSES", "SIZE_RANGE", "make_shapes"]

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow")

# Bounding-circle diameter as a fraction of the side. Large enough that at 32 px a star (~15 px across)
# is still a star and not a blob: with 30-60 % small ViTs trained from scratch sat near chance for
# minutes on this CPU, while the task stays one of finding the object among clutter.
SIZE_RANGE: tuple[float, float] = (0.45, 0.75)
# The fraction of the image an object's mask covers follows from SIZE_RANGE and the shapes' areas
# (smallest: a star at 45 %, ~4 %; largest: a circle at 75 %, ~44 %); tests hold us to it.
MASK_AREA_RANGE: tuple[float, float] = (0.025, 0.46)
MIN_LUMA_CONTRAST = 0.35  # |luma(object) - luma(background base colour)|, colours in [0, 1]

_SUPERSAMPLE = 2  # samples per pixel side; antialiases edges, and the mask is coverage >= 1/2
_CHUNK = 256  # scenes rendered at once: bounds memory to a few tens of MB at 64 px
_MAX_LINES = 3
_MAX_DOTS = 4
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _regular_polygon(k: int, radius: float, phase: float) -> np.ndarray:
    ang = phase + 2.0 * np.pi * np.arange(k) / k
    return np.stack([radius * np.cos(ang), radius * np.sin(ang)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    ang = np.pi / 2 + np.pi * np.arange(2 * points) / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


# Polygons in the object's frame, all inside the unit bounding circle (vertices (V, 2)).
_POLYGONS: dict[str, np.ndarray] = {
    "square": _regular_polygon(4, 1.0, np.pi / 4),
    "triangle": _regular_polygon(3, 1.0, np.pi / 2),
    "star": _star(),
    # Shaft from x=-0.95 (half-width 0.25), head from x=0.1 (half-width 0.7) to the tip at x=1.
    "arrow": np.array([[-0.95, -0.25], [0.1, -0.25], [0.1, -0.7], [1.0, 0.0], [0.1, 0.7], [0.1, 0.25], [-0.95, 0.25]]),
}


def _inside_polygon(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over all points; one pass per edge."""
    inside = np.zeros(px.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, axis=0), strict=True):
        if y0 == y1:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (py >= min(y0, y1)) & (py < max(y0, y1))
        x_at = x0 + (py - y0) * ((x1 - x0) / (y1 - y0))
        inside ^= crosses & (px < x_at)
    return inside


def _inside(name: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Whether points (in the object's frame, bounding radius 1) belong to shape ``name``."""
    if name in _POLYGONS:
        return _inside_polygon(px, py, _POLYGONS[name])
    r2 = px * px + py * py
    if name == "circle":
        return r2 <= 1.0
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "crescent":
        return (r2 <= 1.0) & ((px - 0.45) ** 2 + py * py > 0.8**2)
    if name == "cross":
        ax, ay = np.abs(px), np.abs(py)
        return ((ax <= 0.3) & (ay <= 0.95)) | ((ay <= 0.3) & (ax <= 0.95))
    raise AssertionError(f"no renderer for shape {name!r}")  # SHAPE_CLASSES and this list disagree


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ _LUMA


def _contrasting_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Background base colours and object colours, (n, 3) each, with a luminance gap per scene."""
    bg = rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)
    obj = rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)
    for _ in range(64):  # rejection sampling; about half the draws pass, so this ends in a few rounds
        bad = np.abs(_luma(obj) - _luma(bg)) < MIN_LUMA_CONTRAST
        if not bad.any():
            break
        obj[bad] = rng.uniform(0.0, 1.0, (int(bad.sum()), 3))
    # Whatever is still too close (astronomically unlikely) becomes black or white, whichever is farther.
    bad = np.abs(_luma(obj) - _luma(bg)) < MIN_LUMA_CONTRAST
    obj[bad] = np.where(_luma(bg[bad])[:, None] > 0.5, 0.0, 1.0)
    return bg, obj


def _linear_upsample_matrix(out: int, grid: int) -> np.ndarray:
    """(out, grid) weights that linearly interpolate a coarse grid of ``grid`` knots to ``out`` pixels."""
    pos = (np.arange(out) + 0.5) / out * (grid - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = pos - lo
    w = np.zeros((out, grid), dtype=np.float32)
    w[np.arange(out), lo] = 1.0 - frac
    w[np.arange(out), lo + 1] = frac
    return w


def _draw_scenes(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Every per-scene random choice (geometry, colours, texture, clutter), independent of resolution."""
    diam = rng.uniform(*SIZE_RANGE, n).astype(np.float32)
    rad = diam / 2
    bg_rgb, obj_rgb = _contrasting_colours(rng, n)
    return {
        "rad": rad,
        "cx": rng.uniform(rad, 1.0 - rad).astype(np.float32),  # the bounding circle stays inside the image
        "cy": rng.uniform(rad, 1.0 - rad).astype(np.float32),
        "theta": rng.uniform(0.0, 2.0 * np.pi, n).astype(np.float32),
        "bg_rgb": bg_rgb,
        "obj_rgb": obj_rgb,
        "blotch": rng.uniform(-0.12, 0.12, (n, 4, 4, 3)).astype(np.float32),
        "freq": rng.uniform(3.0, 8.0, n).astype(np.float32),
        "phi": rng.uniform(0.0, np.pi, n).astype(np.float32),
        "phase": rng.uniform(0.0, 2 * np.pi, n).astype(np.float32),
        "n_lines": rng.integers(0, _MAX_LINES + 1, n),
        "n_dots": rng.integers(0, _MAX_DOTS + 1, n),
        "ends": rng.uniform(0.0, 1.0, (n, _MAX_LINES, 4)).astype(np.float32),
        "dots": rng.uniform(0.0, 1.0, (n, _MAX_DOTS, 2)).astype(np.float32),
        "dot_r": rng.uniform(0.02, 0.045, (n, _MAX_DOTS)).astype(np.float32),
        "clutter_rgb": rng.uniform(0.0, 1.0, (n, _MAX_LINES + _MAX_DOTS, 3)).astype(np.float32),
    }


def _render_chunk(
    scene: dict[str, np.ndarray], labels: np.ndarray, size: int, noise: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    m, s = len(labels), _SUPERSAMPLE
    hs = size * s
    # Sample positions in [0, 1] image units; (m, hs, hs) after broadcasting with per-scene values.
    sub = ((np.arange(hs) + 0.5) / hs).astype(np.float32)
    v, u = sub[:, None], sub[None, :]  # v: rows (y), u: columns (x)
    rad, cx, cy, theta = scene["rad"], scene["cx"], scene["cy"], scene["theta"]

    # --- object coverage in [0, 1] per pixel, shape by shape ------------------------------------
    cover = np.zeros((m, size, size), dtype=np.float32)
    for k, name in enumerate(SHAPE_CLASSES):
        idx = np.flatnonzero(labels == k)
        if idx.size == 0:
            continue
        c, sn = np.cos(theta[idx])[:, None, None], np.sin(theta[idx])[:, None, None]
        dx = (u[None] - cx[idx, None, None]) / rad[idx, None, None]  # (k, 1, hs)
        dy = (v[None] - cy[idx, None, None]) / rad[idx, None, None]  # (k, hs, 1)
        px, py = c * dx + sn * dy, -sn * dx + c * dy  # rotate into the object's frame, (k, hs, hs)
        hit = _inside(name, px, py).astype(np.float32)  # (k, hs, hs)
        cover[idx] = hit.reshape(-1, size, s, size, s).mean(axis=(2, 4))  # (k, size, size)

    # --- background: base colour + smooth colour blotches + a faint grating + pixel noise --------
    up = _linear_upsample_matrix(size, 4)  # (size, 4)
    blotch = np.matmul(np.matmul(up, scene["blotch"].transpose(0, 3, 1, 2)), up.T)  # (m, 3, H, W)
    img = scene["bg_rgb"][:, None, None, :] + blotch.transpose(0, 2, 3, 1)  # (m, H, W, 3)
    pix = ((np.arange(size) + 0.5) / size).astype(np.float32)
    freq, phi, phase = (scene[key][:, None, None] for key in ("freq", "phi", "phase"))
    wave = np.sin(2 * np.pi * freq * (pix[None, None, :] * np.cos(phi) + pix[None, :, None] * np.sin(phi)) + phase)
    img += 0.05 * wave[..., None]

    # --- clutter: thin line segments and small dots, kept out of the object's disc ---------------
    pu, pv = pix[None, None, :], pix[None, :, None]  # pixel centres (x, y)
    dist2_obj = (pu - cx[:, None, None]) ** 2 + (pv - cy[:, None, None]) ** 2  # (m, H, W)
    keep_out = dist2_obj > (rad[:, None, None] * 1.15 + 1.5 / size) ** 2
    half_width = 0.6 / size  # lines about 1.2 px wide at any resolution
    n_lines, n_dots, ends, dots, dot_r = (scene[key] for key in ("n_lines", "n_dots", "ends", "dots", "dot_r"))
    # Which clutter item (1-based; 0 = none) shows at each pixel, later items on top; one colour
    # gather and one blend afterwards instead of a full-image blend per item.
    which = np.zeros((m, size, size), dtype=np.int64)
    for j in range(_MAX_LINES):
        x0, y0, x1, y1 = (ends[:, j, q, None, None] for q in range(4))
        ex, ey = x1 - x0, y1 - y0
        t = np.clip(((pu - x0) * ex + (pv - y0) * ey) / np.maximum(ex * ex + ey * ey, 1e-8), 0.0, 1.0)
        on = (pu - x0 - t * ex) ** 2 + (pv - y0 - t * ey) ** 2 <= half_width**2  # (m, H, W)
        which[on & (j < n_lines)[:, None, None]] = j + 1
    for j in range(_MAX_DOTS):
        dist2 = (pu - dots[:, j, 0, None, None]) ** 2 + (pv - dots[:, j, 1, None, None]) ** 2
        which[(dist2 <= dot_r[:, j, None, None] ** 2) & (j < n_dots)[:, None, None]] = _MAX_LINES + j + 1
    which[~keep_out] = 0
    palette = np.concatenate([np.zeros((m, 1, 3), np.float32), scene["clutter_rgb"]], axis=1)  # (m, 1 + items, 3)
    colour = np.take_along_axis(palette, which.reshape(m, -1, 1), axis=1).reshape(m, size, size, 3)
    alpha = np.where(which > 0, np.float32(0.7), np.float32(0.0))[..., None]  # (m, H, W, 1)
    img = img * (1.0 - alpha) + colour * alpha

    # --- the object, painted last with antialiased edges, then sensor-like noise everywhere ------
    a = cover[..., None]  # (m, H, W, 1)
    img = img * (1.0 - a) + scene["obj_rgb"][:, None, None, :] * a
    img += 0.02 * noise.standard_normal(img.shape, dtype=np.float32)
    images = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)  # (m, H, W, 3)
    return images, cover >= 0.5


def make_shapes(n: int, *, seed: int = 0, img_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``n`` scenes of one shape each, deterministically for ``seed``.

    Returns ``(images, labels, masks)``: uint8 ``(n, img_size, img_size, 3)``, int64 ``(n,)`` indexing
    :data:`SHAPE_CLASSES` (balanced: every class appears ``n // 8`` or ``n // 8 + 1`` times, shuffled),
    and bool ``(n, img_size, img_size)``, True on the object's pixels.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"n must be a non-negative number of scenes, got {n!r}.")
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or not 8 <= img_size <= 1024:
        raise ConfigError(f"img_size must be an integer from 8 to 1024 pixels, got {img_size!r}.")
    n, img_size = int(n), int(img_size)
    # Two streams: scene choices are drawn for all n scenes up front, so a seed gives the same scenes
    # at every resolution (only the per-pixel sensor noise, from the second stream, depends on it).
    rng, noise = (np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(2))
    labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES)).astype(np.int64)
    scenes = _draw_scenes(rng, n)
    images = np.empty((n, img_size, img_size, 3), dtype=np.uint8)
    masks = np.empty((n, img_size, img_size), dtype=bool)
    chunk = max(1, _CHUNK * 32 * 32 // (img_size * img_size))  # keep the per-chunk memory constant
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        part = {key: value[start:stop] for key, value in scenes.items()}
        images[start:stop], masks[start:stop] = _render_chunk(part, labels[start:stop], img_size, noise)
    return images, labels, masks
