"""Captions computed from the data a chart shows, so that the text never contradicts the plot.

Plain numpy, no Streamlit: each function takes what the page plotted and returns the sentence
under it. The ViT paper's findings are quoted as the paper's, and the sentence about *this* model
is measured on its own numbers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["attention_distance_caption", "position_similarity_caption"]

# How much higher (in cosine) same-row/column or neighbouring patches must be than the rest for the
# caption to call it a structure; below this the tiles look uniform to the eye.
STRUCTURE_MARGIN = 0.1
# A change of the layer-mean attention distance smaller than this share of the image side is "flat".
FLAT_SHARE = 0.05


def _pair_groups(gh: int, gw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boolean (N, N) masks over patch pairs: neighbours (8-connected), same row or column, the rest, not self."""
    r, c = np.divmod(np.arange(gh * gw), gw)
    dr, dc = np.abs(r[:, None] - r[None]), np.abs(c[:, None] - c[None])
    other = ~np.eye(gh * gw, dtype=bool)
    near = other & (np.maximum(dr, dc) == 1)
    line = other & ((dr == 0) | (dc == 0)) & ~near
    far = other & ~near & ~line
    return near, line, far, other


def position_similarity_caption(sim: np.ndarray) -> str:
    """What the position-similarity grid ``sim`` (gh, gw, gh, gw) shows: measured neighbour and row/column contrasts."""
    gh, gw = sim.shape[:2]
    flat = np.asarray(sim, dtype=np.float64).reshape(gh * gw, gh * gw)
    near, line, far, _ = _pair_groups(gh, gw)
    if not far.any() or not line.any():
        return f"The grid is only {gh}×{gw} patches: too small to tell neighbours from distant patches."
    m_near, m_line, m_far = (float(flat[g].mean()) for g in (near, line, far))
    numbers = (f"mean cosine similarity: neighbours {m_near:.2f}, same row or column {m_line:.2f}, "
               f"other patches {m_far:.2f}")
    findings = []
    if m_near - m_far >= STRUCTURE_MARGIN:
        findings.append("neighbouring patches have more similar embeddings")
    if m_line - m_far >= STRUCTURE_MARGIN:
        findings.append("patches in the same row or column are more similar than the rest")
    if not findings:
        return (f"Here the tiles are close to uniform ({numbers}): this model's position embeddings show little "
                "2-D structure. The ViT paper found that trained ViTs learn neighbourhood and row/column "
                "structure from 1-D position indices.")
    return (f"Here {' and '.join(findings)} ({numbers}): the model learned 2-D image topology from 1-D "
            "position indices, as the ViT paper found.")


def attention_distance_caption(dist: np.ndarray, image_size: int) -> str:
    """How the plotted mean attention distance ``dist`` (depth, heads) in pixels changes with depth."""
    d = np.asarray(dist, dtype=np.float64)
    layer_mean = d.mean(axis=1)  # (depth,)
    depth = len(layer_mean)
    if depth < 2:
        return f"One layer: its heads attend {layer_mean[0]:.1f} px away on average."
    first, last = layer_mean[0], layer_mean[-1]
    change = last - first
    if abs(change) < FLAT_SHARE * image_size:
        trend = "stays about the same with depth"
    elif change > 0:
        trend = "grows with depth"
    else:
        trend = "falls with depth"
    spread = d[0].max() - d[0].min()
    return (f"Here the heads' average distance {trend}: {first:.1f} px in layer 1 and {last:.1f} px in layer "
            f"{depth} (of a {image_size}-px image); the heads of layer 1 span {spread:.1f} px, from "
            f"{d[0].min():.1f} to {d[0].max():.1f}.")
