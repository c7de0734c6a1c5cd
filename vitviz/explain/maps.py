"""Post-processing shared by every method: upsample grid maps to the input and min-max normalise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["normalize_maps", "upsample_maps"]


def normalize_maps(maps: torch.Tensor, rel_eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise each map of a batch (B, ...) to [0, 1] as float32; a constant map becomes 0.

    A map counts as constant when its range is below ``rel_eps`` of its largest magnitude (float32
    rounding noise), not below an absolute threshold: relevance through a 1e-6 layer scale is ~1e-13
    everywhere and still a map.
    """
    flat = maps.detach().float().reshape(maps.shape[0], -1)  # (B, P)
    lo = flat.min(dim=1, keepdim=True).values  # (B, 1)
    span = flat.max(dim=1, keepdim=True).values - lo  # (B, 1)
    scale = flat.abs().max(dim=1, keepdim=True).values  # (B, 1)
    varied = (span > rel_eps * scale) & (span > 0)
    out = torch.where(varied, (flat - lo) / span.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int], cell: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear upsampling of grid maps (B, gh, gw) to pixels (B, H, W).

    With ``cell`` (pixels per grid cell), the grid is first stretched over the pixels it actually
    covers, ``(gh * cell_h, gw * cell_w)``, then cropped to (H, W) or padded by repeating the edge:
    a ViT ignores the remainder pixels past its last full patch, and a padded CNN's last cell
    reaches past the image, so stretching the grid over (H, W) would misplace every cell a little.
    """
    h, w = int(size[0]), int(size[1])
    x = maps.detach().float()[:, None]  # (B, 1, gh, gw)
    if cell is None:
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    ch, cw = maps.shape[-2] * cell[0], maps.shape[-1] * cell[1]
    x = F.interpolate(x, size=(ch, cw), mode="bilinear", align_corners=False)  # (B, 1, gh*ph, gw*pw)
    x = x[..., :h, :w]
    if x.shape[-2] < h or x.shape[-1] < w:
        x = F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]), mode="replicate")
    return x[:, 0]  # (B, H, W)
