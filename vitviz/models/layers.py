"""Transformer building blocks shared by the ViT and the hybrid.

Module and parameter names follow timm's (``attn.qkv``, ``mlp.fc1``, ``norm1`` ...) so that a timm
state dict loads into our models unchanged and ours into timm's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ConfigError


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to ``embed_dim`` (a strided conv)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) of an input of this size."""
        return height // self.patch_size, width // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)


class Attention(nn.Module):
    """Multi-head self-attention with 1/sqrt(d) scaling and an output projection.

    The default path is fused ``scaled_dot_product_attention``. ``need_weights=True`` takes the
    explicit path for that call only and returns the softmax weights, still in the autograd graph so
    that gradient-based explanations can differentiate through them.
    """

    # The kernel a training forward uses (set_training_attention). "auto" trains on the explicit path on
    # CPUs: PyTorch's CPU flash kernel spends much of a step on the few tokens and small heads of the
    # models trained here, its backward most of all; the explicit path measured 0.92-0.96x the step time
    # for the 65-token shapes ViTs and no slower, within noise, for the others or ViT-Ti/16
    # (benchmarks/bench_attention.py). Inference keeps the fused kernel, the faster one there.
    training_path: str = "auto"

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, hd)
        weights = None
        if need_weights or self._trains_explicitly(x):
            # scale q (N x hd) rather than the N x N scores: measured at ViT-B/16 size, 1 thread, 2.02 vs
            # 2.18 ms per layer (fused: 1.96); explanations pay for this path (bench_rollout.py)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
            x = self.attn_drop(attn) @ v  # (B, heads, N, hd)
            weights = attn if need_weights else None
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )  # (B, heads, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj_drop(self.proj(x)), weights

    def _trains_explicitly(self, x: torch.Tensor) -> bool:
        if not self.training:
            return False
        return self.training_path == "explicit" or (self.training_path == "auto" and x.is_cpu)


ATTENTION_PATHS = ("auto", "fused", "explicit")


def set_training_attention(model: nn.Module, path: str) -> None:
    """Choose the kernel every :class:`Attention` of ``model`` trains with: ``"auto"`` (explicit on
    CPU, fused elsewhere), ``"fused"`` or ``"explicit"``. Results agree to float rounding; speed differs."""
    if path not in ATTENTION_PATHS:
        raise ConfigError(f"unknown attention path {path!r}; choose one of {', '.join(ATTENTION_PATHS)}.")
    for module in model.modules():
        if isinstance(module, Attention):
            module.training_path = path


class Mlp(nn.Module):
    """The transformer's position-wise feed-forward network: Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescaling the survivors."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel gain on a residual branch (CaiT's "layer scale"), learned from ``init_values``.

    The parameter is called ``gamma`` as in timm, so DeiT-III and DINOv2 weights load unchanged.
    """

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma  # (..., D) * (D,)


class Block(nn.Module):
    """Pre-norm encoder block: x + Attn(LN(x)), then x + MLP(LN(x)).

    With ``init_values`` each branch is scaled per channel first (``ls1``/``ls2``, layer scale);
    without, ``ls1``/``ls2`` are identities and the block is the paper's.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, eps: float = 1e-6,
                 init_values: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights=need_weights)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, weights


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic (antialiased) resampling of the patch part of a position embedding to a new grid.

    The paper fine-tunes at higher resolution this way (Sec. 3.2); prefix tokens are kept as they are.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]  # (1, P, D), (1, gh*gw, D)
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)  # (1, P + gh'*gw', D)
