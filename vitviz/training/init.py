"""Training-time initialisations for transformers that learn from few images (the model stays a plain ViT).

``mimetic`` (Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers", ICML 2023): set each
head's ``W_q^T W_k`` near ``+I`` and each layer's ``W_o W_v`` near ``-I`` (plus noise), as in trained
transformers, so that at step 0 a token already attends to tokens that resemble it; with 2-D sin-cos
position embeddings (Vaswani et al.; MAE) as the starting point of the learned positions, "resemble"
includes "is nearby". A ViT then starts with a locality prior instead of uniform attention; measured here on
``shapes`` it left the chance-level plateau in the first epoch instead of the third and reached a given
accuracy in about half the epochs.

``conv`` (after Cordonnier, Loukas & Jaggi, "On the Relationship between Self-Attention and Convolutional
Layers", ICLR 2020): every layer starts as a 3x3 convolution over the patch grid. Head h attends to the
token at a fixed offset (up, down, left, right, the diagonals; sharply in the first layer, more widely
deeper), so a layer's output is a sum of per-offset linear maps of the neighbours: a convolution whose
kernel is the heads' value/output weights. On ``shapes`` it took the ViT from 95.2 % after 30 epochs
(mimetic) to 98.8 % after 16, and a 4-block one to 99.45 % in under 4 minutes (checkpoints/README.md).
Cordonnier et al. use relative position encodings; a plain ViT only has absolute ones, so the position
embedding starts as 2-D Fourier codes and each head's query *rotates* them by its offset (a shift of a
sin-cos code is a rotation), which puts its logit maximum exactly on the neighbour. ConViT (d'Ascoli et
al., 2021) showed that such a start helps ViTs on small data most.

Only initial values change: parameter names and shapes are the ViT's, and timm loads the result.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitviz.errors import ConfigError

INITS = ("default", "mimetic", "conv")

# Head offsets (rows, cols) of the conv init, in the order heads take them: the 8 neighbours of a 3x3
# kernel (its centre is the residual path), then the centre itself and the 5x5 ring for wider models.
_CONV_OFFSETS: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1), (0, 0),
    *((r, c) for r in range(-2, 3) for c in range(-2, 3) if max(abs(r), abs(c)) == 2),
)


def _grid_coords(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of every patch, row-major, (gh*gw,) each, float64."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    return rows.flatten(), cols.flatten()


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """2-D sin-cos position codes (gh*gw, dim): half the channels encode the row, half the column."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))  # (dim/4,)
    parts = []
    for pos in _grid_coords(grid):
        angle = pos[:, None] * omega[None]  # (gh*gw, dim/4)
        parts += [angle.sin(), angle.cos()]
    codes = torch.cat(parts, dim=1)  # (gh*gw, 4 * (dim/4))
    return torch.nn.functional.pad(codes, (0, dim - codes.shape[1])).float()  # (gh*gw, dim)


def _factor(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A @ B the best rank-``rank`` approximation of ``target``, split evenly (sqrt of S)."""
    u, s, vt = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vt[:rank]  # (d, r), (r, d)


@torch.no_grad()
def mimetic_init(model: nn.Module, *, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4)
                 ) -> None:
    """Apply the mimetic initialisation to every attention layer of a ViT or hybrid (in place).

    Per head ``W_q^T W_k ~ a Z + b I``; per layer ``W_o W_v ~ a Z - b I``, ``Z ~ N(0, 1/d)``, with the
    paper's (a, b) = (0.7, 0.7) and (0.4, 0.4). Draws from torch's global generator (seeded by the run).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to initialise")
    for block in blocks:
        attn = block.attn
        d, heads = attn.qkv.in_features, attn.num_heads
        hd = d // heads
        wq, wk, wv = attn.qkv.weight.view(3, d, d)  # each (d_out, d_in)
        eye = torch.eye(d)
        for h in range(heads):
            rows = slice(h * hd, (h + 1) * hd)
            a, b = _factor(qk[0] * torch.randn(d, d) / math.sqrt(d) + qk[1] * eye, hd)  # (d, hd), (hd, d)
            wq[rows] = a.T  # logits x_i^T Wq_h^T Wk_h x_j = x_i^T (a b) x_j
            wk[rows] = b
        a, b = _factor(vo[0] * torch.randn(d, d) / math.sqrt(d) - vo[1] * eye, d)
        attn.proj.weight.copy_(a)  # W_o W_v = a b
        wv.copy_(b)
    grid = model.grid_size
    model.pos_embed[0, model.num_prefix_tokens:] = sincos_pos_embed(grid, model.pos_embed.shape[-1])
    model.pos_embed[0, : model.num_prefix_tokens] = 0.0


def _fourier_codes(grid: tuple[int, int], freqs: torch.Tensor) -> torch.Tensor:
    """(gh*gw, 4K) codes [cos, sin](w_k * row) ++ [cos, sin](w_k * col), interleaved per frequency."""
    parts = []
    for pos in _grid_coords(grid):
        angle = pos[:, None] * freqs[None]  # (N, K)
        parts.append(torch.stack([angle.cos(), angle.sin()], dim=-1).flatten(1))  # (N, 2K)
    return torch.cat(parts, dim=1)  # (N, 4K)


def _shift_rotation(offset: tuple[int, int], freqs: torch.Tensor) -> torch.Tensor:
    """(4K, 4K) block-diagonal R with R @ code(r, c) = code(r + dr, c + dc) (angle addition)."""
    blocks = []
    for delta in offset:  # rows first, as in _fourier_codes
        for angle in (freqs * delta).tolist():
            c, s = math.cos(angle), math.sin(angle)
            blocks.append(torch.tensor([[c, -s], [s, c]], dtype=torch.float64))
    return torch.block_diag(*blocks)


@torch.no_grad()
def conv_init(model: nn.Module, *, sharpness: float = 4.0, pos_scale: float = 2.0) -> None:
    """Start every attention layer of a ViT or hybrid as a 3x3 convolution over the patch grid (in place).

    The position embedding gets 2-D Fourier codes at frequencies ``pi k / G`` (k = 1..K, G the longer
    grid side), written twice with opposite signs into the last 8K channels: a head reads the difference
    of a pair, so LayerNorm's mean subtraction cancels, and LayerNorm's scale changes mostly how sharp
    the attention is, not where it peaks. The patch projection and the blocks' output layers start with
    zero weights into those channels, so every layer sees clean codes. Head h's query reads the codes
    rotated by its offset, its key the codes themselves: its logit for token j seen from token i is
    ``sharpness / (1 + layer) * sum_k cos(w_k (pos_j - pos_i - offset_h))`` summed over both axes,
    maximal at the neighbour (each layer calibrated for its LayerNorm scale). Values, outputs and MLPs
    are the kernel weights: random, LeCun-normal.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to initialise")
    dim, heads = blocks[0].attn.qkv.in_features, blocks[0].attn.num_heads
    head_dim = dim // heads
    grid = model.grid_size
    n_freq = min(head_dim // 4, dim // 16, max(grid) - 1)  # K: 4K query dims per head, 8K position channels
    if n_freq < 1:
        raise ConfigError(f"init 'conv' needs a head dimension of at least 4, a width of at least 16 and a patch "
                          f"grid of at least 2x2 (got head_dim {head_dim}, width {dim}, grid {grid}); use fewer "
                          "heads, a wider model or init 'mimetic'.")
    freqs = math.pi * torch.arange(1, n_freq + 1, dtype=torch.float64) / max(grid)  # (K,)
    codes = _fourier_codes(grid, freqs)  # (N, 4K)
    n_code = codes.shape[1]
    first = dim - 2 * n_code  # position channels: [first, dim), as pairs (+code, -code)
    pos = torch.zeros(codes.shape[0], dim, dtype=torch.float64)
    pos[:, first::2], pos[:, first + 1::2] = pos_scale * codes, -pos_scale * codes
    model.pos_embed.zero_()
    model.pos_embed[0, model.num_prefix_tokens:] = pos.float()
    model.patch_embed.proj.weight[first:] = 0.0  # content stays out of the position channels at step 0
    if model.patch_embed.proj.bias is not None:
        model.patch_embed.proj.bias[first:] = 0.0
    # read[m] = (x[first + 2m] - x[first + 2m + 1]) / (2 pos_scale): the code, free of LayerNorm's mean
    read = torch.zeros(n_code, dim, dtype=torch.float64)
    read[torch.arange(n_code), first + 2 * torch.arange(n_code)] = 0.5 / pos_scale
    read[torch.arange(n_code), first + 1 + 2 * torch.arange(n_code)] = -0.5 / pos_scale
    for block in blocks:
        attn = block.attn
        wq, wk, wv = attn.qkv.weight.view(3, dim, dim)  # each (d_out, d_in)
        # Kernel weights: values, outputs and both MLP layers LeCun-normal, so that every layer starts with
        # unit gain like a conv layer. The ViT's default (std 0.02) makes each block a near-identity; with it
        # this init sat at chance for 2 epochs on shapes, with unit gain it left chance in the first.
        for linear in (attn.proj, block.mlp.fc1, block.mlp.fc2):
            torch.nn.init.trunc_normal_(linear.weight, std=linear.in_features**-0.5)
        torch.nn.init.trunc_normal_(wv, std=dim**-0.5)
        # Nor do the blocks write into the position channels at step 0: with unit-gain blocks the
        # residual stream grows layer by layer, and random writes there blurred layer 6's heads to ~20 %
        # on their neighbour; kept clean, only LayerNorm's growing scale softens them (calibrated below).
        attn.proj.weight[first:] = 0.0
        block.mlp.fc2.weight[first:] = 0.0
        if attn.qkv.bias is not None:
            attn.qkv.bias[: 2 * dim] = 0.0
        for h in range(heads):
            rows = slice(h * head_dim, h * head_dim + n_code)  # the head's first 4K query/key dims
            offset = _CONV_OFFSETS[h % len(_CONV_OFFSETS)]
            wq[rows] = (_shift_rotation(offset, freqs) @ read).float()  # reads code(pos_i + offset)
            wk[rows] = read.float()
    _calibrate_sharpness(model, n_code, sharpness)


@torch.no_grad()
def _calibrate_sharpness(model: nn.Module, n_code: int, sharpness: float) -> None:
    """Scale each layer's positional query/key weights so its logits peak at ``sharpness / (1 + layer)``.

    LayerNorm divides the codes by the token's scale, which grows with depth as unit-gain blocks add to
    the residual stream; a forward pass on a unit-variance random batch (what normalised images look
    like to a LeCun-initialised patch projection) measures that scale layer by layer. Logits are
    ``(q . k) / sqrt(head_dim)``, so each side gets ``sqrt(sharpness * sqrt(head_dim)) * scale``.
    """
    size = model.vit_config.img_size
    gen = torch.Generator().manual_seed(0)  # the run's global generator stays untouched
    device = model.pos_embed.device
    was_training = model.training
    model.eval()  # no dropout or stochastic depth in the measurement
    x = model._embed(torch.randn(8, model.vit_config.in_chans, size, size, generator=gen).to(device))  # (8, 1+N, D)
    for layer, block in enumerate(model.blocks):
        attn, dim = block.attn, block.attn.qkv.in_features
        tokens = x[:, model.num_prefix_tokens:]  # (8, N, D)
        scale = tokens.var(dim=-1, unbiased=False).add(block.norm1.eps).sqrt().mean().item()
        # sharpness / (1 + layer): local kernels first, wider ones deeper (ConViT's trained ViTs end so;
        # on shapes, equally sharp heads in every layer left chance about an epoch later)
        gain = math.sqrt(sharpness / (1 + layer) * math.sqrt(attn.head_dim)) * scale
        wq, wk, _ = attn.qkv.weight.view(3, dim, dim)
        for h in range(attn.num_heads):
            rows = slice(h * attn.head_dim, h * attn.head_dim + n_code)
            wq[rows] *= gain
            wk[rows] *= gain
        x, _ = block(x)
    model.train(was_training)


def apply_init(model: nn.Module, name: str, family: str) -> None:
    """Apply the initialisation ``name`` (``default`` keeps the model's own)."""
    if name == "default":
        return
    if family not in ("vit", "hybrid"):
        raise ConfigError(f"init {name!r} applies to ViTs and hybrids, not to a {family} model; use init 'default'.")
    (conv_init if name == "conv" else mimetic_init)(model)
