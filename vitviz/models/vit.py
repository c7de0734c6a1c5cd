"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021), from scratch.

Read it top to bottom: patches -> tokens (+ class token, + positions) -> pre-norm encoder -> norm ->
pool (class token or mean) -> head. Parameter names match timm's VisionTransformer.

Optional, off by default: register tokens after the class token (``reg_tokens``, "Vision Transformers
Need Registers") and layer scale on every residual branch (``init_values``), which DeiT-III and DINOv2 use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitviz.config import ViTConfig
from vitviz.models.layers import Block, PatchEmbed, resample_pos_embed


class VisionTransformer(nn.Module):
    """ViT with class token (+ optional register tokens), learned position embeddings and class-token or
    mean pooling. ``num_prefix_tokens`` (class + registers) tokens precede the patch tokens.

    ``forward(x, return_attention=True)`` also returns every layer's attention weights
    ``[(B, heads, N, N)] * depth``, computed on the explicit path for that call only.
    """

    family = "vit"

    def __init__(self, config: ViTConfig, patch_embed: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config  # the hybrid replaces this with its own config after building
        self.vit_config = c = config
        self.num_prefix_tokens = 1 + c.reg_tokens  # the class token, then the registers
        self.patch_embed = patch_embed or PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        gh, gw = self.patch_embed.grid_for(c.img_size, c.img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))  # (1, 1, D)
        # registers exist only when asked for, so plain ViTs keep their state dict and checkpoints
        self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, c.embed_dim)) if c.reg_tokens else None  # (1, R, D)
        # one entry per prefix token too: explanations and inits read pos_embed[:, num_prefix_tokens:] as the grid
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + gh * gw, c.embed_dim))  # (1, P+N, D)
        self.pos_drop = nn.Dropout(c.dropout)
        rates = torch.linspace(0, c.drop_path, c.depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.dropout, c.attn_dropout, r, c.norm_eps,
                  c.init_values)
            for r in rates
        )
        # timm's convention: class-token pooling normalises all tokens; mean pooling normalises the mean.
        mean_pool = c.pooling == "mean"
        self.norm = nn.Identity() if mean_pool else nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.fc_norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps) if mean_pool else nn.Identity()
        self.head_drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.embed_dim, c.num_classes) if c.num_classes else nn.Identity()
        self._init_weights()

    # --- what explanation tools read -------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at the configured image size."""
        size = self.vit_config.img_size
        return self.patch_embed.grid_for(size, size)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of an input of ``height`` x ``width`` pixels."""
        return self.patch_embed.grid_for(height, width)

    @property
    def patch_embed_weight(self) -> torch.Tensor:
        """Patch projection filters, (D, C, p, p)."""
        return self.patch_embed.proj.weight

    @property
    def num_classes(self) -> int:
        return self.vit_config.num_classes

    # --- forward ---------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patch_grid(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)  # (B, N, D)
        pos = resample_pos_embed(self.pos_embed, self.grid_size, grid, self.num_prefix_tokens)  # (1, P+N, D)
        prefix = [self.cls_token] if self.reg_token is None else [self.cls_token, self.reg_token]
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)  # (B, P+N, D)
        return self.pos_drop(x + pos)

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        """Tokens after the encoder and final norm, (B, P+N, D) with P = num_prefix_tokens; with attention
        weights when asked."""
        x = self._embed(x)
        attentions = []
        for block in self.blocks:
            x, weights = block(x, need_weights=return_attention)
            if return_attention:
                attentions.append(weights)  # (B, heads, P+N, P+N)
        x = self.norm(x)
        return (x, attentions) if return_attention else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens (class token, or the mean of the patch tokens after the prefix) and classify."""
        if self.vit_config.pooling == "mean":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        else:
            x = x[:, 0]  # (B, D)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Logits (B, classes); ``(logits, attentions)`` when ``return_attention``."""
        if return_attention:
            feats, attentions = self.forward_features(x, return_attention=True)
            return self.forward_head(feats), attentions
        return self.forward_head(self.forward_features(x))

    # --- initialisation (as in the reference JAX/timm ViT: truncated normal, zero biases) ----------
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # as timm; plain ViTs draw nothing more, so seeds repeat
        for name, module in self.named_modules():
            if name.startswith("patch_embed.backbone"):
                continue  # CNN backbones initialise themselves
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                # a patch projection is a Linear over the flattened patch: LeCun-normal as in the paper's code
                fan_in = module.in_channels * math.prod(module.kernel_size)
                nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)  # the paper zero-initialises the head
            nn.init.zeros_(self.head.bias)
