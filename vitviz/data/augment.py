"""Batched data augmentation as tensor ops on whatever device the batch lives on.

As in airbench, the training data stays on the accelerator and a whole batch is augmented with a
handful of tensor ops: no per-image Python loop, no worker processes. Every random draw comes from
the ``generator`` argument when one is given, so a run resumed with the saved generator state
augments bit-for-bit as the original would have.

Inputs are float ``(B, C, H, W)`` batches in [0, 1], before normalisation; :func:`normalize` comes
after augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vitviz.errors import ConfigError

__all__ = ["RANDAUGMENT_OPS", "Augment", "mixup_cutmix", "normalize", "random_erase"]

# Equalize is left out: a per-image histogram equalisation has no cheap batched form.
RANDAUGMENT_OPS: tuple[str, ...] = (
    "identity", "brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast",
    "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------------
# random draws that honour a generator living on another device than the batch


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) on ``device``, drawn from ``generator`` (on the generator's own device)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _randint(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    where = generator.device if generator is not None else device
    return torch.randint(high, shape, generator=generator, device=where).to(device)


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return low + (high - low) * _rand((n,), generator, device)


def _sign(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.where(_rand((n,), generator, device) < 0.5, -1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# the building blocks, each one batched


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reflect-pad by ``padding`` and crop each image back to its size at a random integer offset."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")  # (B, C, H + 2p, W + 2p)
    dy = _randint(2 * padding + 1, (b,), generator, x.device)  # (B,) row offsets
    dx = _randint(2 * padding + 1, (b,), generator, x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
    # One gather for the whole batch: (B, H, W, C) from the channels-last view of the padded images.
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = _rand((x.shape[0],), generator, x.device) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _warp(x: torch.Tensor, theta: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """Resample every image through its own 2x3 matrix (output -> input, normalised coordinates)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _affine_matrices(
    angle: torch.Tensor,
    scale: torch.Tensor,
    tx: torch.Tensor,
    ty: torch.Tensor,
    shear_x: torch.Tensor,
    shear_y: torch.Tensor,
) -> torch.Tensor:
    """(B, 2, 3) output->input matrices for: shear, then rotate by ``angle`` (radians), scale, translate.

    Translations are fractions of the image side (normalised coordinates span 2 per side).
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    one = torch.ones_like(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    shear = torch.stack([torch.stack([one, shear_x], -1), torch.stack([shear_y, one], -1)], -2)  # (B, 2, 2)
    fwd = scale[:, None, None] * (rot @ shear)  # input -> output linear part, (B, 2, 2)
    # Closed-form 2x2 inverse: no linear-algebra kernel (and no solver library) on the accelerator.
    a, b, c, d = fwd[:, 0, 0], fwd[:, 0, 1], fwd[:, 1, 0], fwd[:, 1, 1]
    inverse = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / (a * d - b * c)[:, None, None]
    shift = torch.stack([2 * tx, 2 * ty], -1)[:, :, None]  # (B, 2, 1)
    return torch.cat([inverse, -(inverse @ shift)], dim=-1)  # (B, 2, 3)


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)  # (B, 1, H, W)


def _blend(base: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``base + factor * (x - base)`` clamped to [0, 1], a per-image factor (B,)."""
    return (base + factor.to(x.dtype).view(-1, 1, 1, 1) * (x - base)).clamp(0.0, 1.0)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel, depthwise, with edge replication."""
    c = x.shape[1]
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13.0
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)


def _randaugment_layer(
    x: torch.Tensor, magnitude: int, padding_mode: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Apply one randomly chosen op per image (RandAugment's inner step), batched.

    Every op is computed for the whole batch and each image keeps the result of its own op
    (``torch.where``): a few cheap elementwise passes and one warp beat gathering sub-batches,
    which would need a host sync per op on an accelerator.
    """
    b, dev = x.shape[0], x.device
    m = magnitude / 30.0  # torchvision's 31 bins: magnitude 30 is the strongest
    op = _randint(len(RANDAUGMENT_OPS), (b,), generator, dev)  # (B,)
    sign = _sign(b, generator, dev)  # (B,) direction of signed ops
    factor = 1.0 + 0.9 * m * sign  # (B,) enhancement factor, as torchvision's linspace(0, 0.9)

    def chosen(name: str) -> torch.Tensor:
        return (op == RANDAUGMENT_OPS.index(name)).view(-1, 1, 1, 1)

    out = x
    out = torch.where(chosen("brightness"), _blend(torch.zeros_like(x), x, factor), out)
    out = torch.where(chosen("color"), _blend(_luma(x), x, factor), out)
    out = torch.where(chosen("contrast"), _blend(_luma(x).mean(dim=(1, 2, 3), keepdim=True), x, factor), out)
    out = torch.where(chosen("sharpness"), _blend(_smooth(x), x, factor), out)
    step = 2.0 ** round(4 * m)  # posterize keeps 8 - round(4m) bits
    out = torch.where(chosen("posterize"), torch.floor(x * 255.0 / step) * step / 255.0, out)
    out = torch.where(chosen("solarize"), torch.where(x >= 1.0 - m, 1.0 - x, x), out)
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    stretched = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    out = torch.where(chosen("autocontrast"), stretched, out)

    # The geometric ops share one warp; images whose op is not geometric keep their pixels exactly.
    zero = torch.zeros(b, device=dev)
    angle = torch.where(op == RANDAUGMENT_OPS.index("rotate"), sign * math.radians(30.0 * m), zero)
    shx = torch.where(op == RANDAUGMENT_OPS.index("shear_x"), sign * 0.3 * m, zero)
    shy = torch.where(op == RANDAUGMENT_OPS.index("shear_y"), sign * 0.3 * m, zero)
    shift = sign * (150.0 / 331.0) * m  # torchvision's translate range, as a fraction of the side
    tx = torch.where(op == RANDAUGMENT_OPS.index("translate_x"), shift, zero)
    ty = torch.where(op == RANDAUGMENT_OPS.index("translate_y"), shift, zero)
    theta = _affine_matrices(angle, torch.ones(b, device=dev), tx, ty, shx, shy)  # (B, 2, 3)
    geometric = torch.stack([op == RANDAUGMENT_OPS.index(n) for n in _GEOMETRIC]).any(0).view(-1, 1, 1, 1)
    return torch.where(geometric, _warp(x, theta, padding_mode), out)


# --------------------------------------------------------------------------------------------------
# the public pieces


class Augment(torch.nn.Module):
    """Random crop, flip, affine warp and RandAugment for float ``(B, C, H, W)`` batches in [0, 1].

    Applied in that order, each only when switched on; with everything off the batch is returned as
    is. Flips are off by default: whether mirroring preserves the class is the caller's call.

    Args:
        crop_padding: reflect-pad by this many pixels, then crop back at a random offset per image.
        flip: mirror left-right with probability 1/2 per image.
        affine: random rotation (+-``max_rotate`` degrees), scale (1 +- ``max_scale``) and
            translation (+-``max_translate`` of the side) per image, one ``grid_sample`` per batch.
        randaugment: ``randaugment_ops`` random ops per image at ``randaugment_magnitude`` (0-30,
            torchvision's scale) from :data:`RANDAUGMENT_OPS`.
        padding_mode: what the warps sample outside the image ("reflection", "border" or "zeros").
    """

    def __init__(
        self,
        *,
        crop_padding: int = 0,
        flip: bool = False,
        affine: bool = False,
        max_rotate: float = 10.0,
        max_scale: float = 0.1,
        max_translate: float = 0.1,
        randaugment: bool = False,
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 9,
        padding_mode: str = "reflection",
    ) -> None:
        super().__init__()
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ConfigError(f"crop_padding must be a non-negative integer, got {crop_padding!r}.")
        if not 0.0 <= max_rotate <= 180.0:
            raise ConfigError(f"max_rotate must be 0 to 180 degrees, got {max_rotate}.")
        if not 0.0 <= max_scale < 1.0:
            raise ConfigError(f"max_scale must be in [0, 1), e.g. 0.1 for +-10 %, got {max_scale}.")
        if not 0.0 <= max_translate < 1.0:
            raise ConfigError(f"max_translate must be in [0, 1), a fraction of the side, got {max_translate}.")
        if not isinstance(randaugment_ops, int) or randaugment_ops < 1:
            raise ConfigError(f"randaugment_ops must be a positive integer, got {randaugment_ops!r}.")
        if not isinstance(randaugment_magnitude, int) or not 0 <= randaugment_magnitude <= 30:
            raise ConfigError(f"randaugment_magnitude must be an integer from 0 to 30, got {randaugment_magnitude!r}.")
        if padding_mode not in ("reflection", "border", "zeros"):
            raise ConfigError(f"padding_mode must be 'reflection', 'border' or 'zeros', got {padding_mode!r}.")
        self.crop_padding = crop_padding
        self.flip = bool(flip)
        self.affine = bool(affine)
        self.max_rotate = float(max_rotate)
        self.max_scale = float(max_scale)
        self.max_translate = float(max_translate)
        self.randaugment = bool(randaugment)
        self.randaugment_ops = randaugment_ops
        self.randaugment_magnitude = randaugment_magnitude
        self.padding_mode = padding_mode

    @property
    def active(self) -> bool:
        """Whether any augmentation is switched on."""
        return bool(self.crop_padding or self.flip or self.affine or self.randaugment)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a float batch ``(B, C, H, W)`` in [0, 1]; same shape, dtype and device back."""
        if x.ndim != 4 or not x.is_floating_point():
            raise ConfigError(
                f"Augment takes a float batch (B, C, H, W) in [0, 1], got {x.dtype} of shape {tuple(x.shape)}; "
                "convert uint8 images with x.float() / 255 first."
            )
        if self.crop_padding >= min(x.shape[-2:]) and self.crop_padding:
            raise ConfigError(f"crop_padding {self.crop_padding} must be smaller than the image side {x.shape[-1]}.")
        if not self.active or x.shape[0] == 0:
            return x
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, generator)
        if self.flip:
            x = random_flip(x, generator)
        if self.affine:
            b, dev = x.shape[0], x.device
            angle = _uniform(-self.max_rotate, self.max_rotate, b, generator, dev) * (math.pi / 180.0)
            scale = _uniform(1.0 - self.max_scale, 1.0 + self.max_scale, b, generator, dev)
            tx = _uniform(-self.max_translate, self.max_translate, b, generator, dev)
            ty = _uniform(-self.max_translate, self.max_translate, b, generator, dev)
            zero = torch.zeros(b, device=dev)
            x = _warp(x, _affine_matrices(angle, scale, tx, ty, zero, zero), self.padding_mode)
        if self.randaugment:
            for _ in range(self.randaugment_ops):
                x = _randaugment_layer(x, self.randaugment_magnitude, self.padding_mode, generator)
        return x

    def extra_repr(self) -> str:
        return (
            f"crop_padding={self.crop_padding}, flip={self.flip}, affine={self.affine}, "
            f"randaugment={self.randaugment} (ops={self.randaugment_ops}, magnitude={self.randaugment_magnitude})"
        )


def random_erase(
    x: torch.Tensor,
    prob: float,
    generator: torch.Generator | None = None,
    *,
    scale: tuple[float, float] = (0.02, 1.0 / 3.0),
    ratio: tuple[float, float] = (0.3, 3.3),
    fill: float = 0.0,
) -> torch.Tensor:
    """Random erasing (Zhong et al., AAAI 2020) on a *normalised* batch ``(B, C, H, W)``.

    With probability ``prob`` per image, one rectangle covering a ``scale`` fraction of the image
    (uniform) with aspect ratio in ``ratio`` (log-uniform) is set to ``fill``. The default 0 is the
    dataset's mean colour after normalisation, timm's "const" mode and DeiT's recipe (prob 0.25).
    Rectangles that would not fit are clamped to the image instead of redrawn, so the draws per batch
    are fixed and a resumed run stays bit-identical.
    """
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"the random-erasing probability must be in [0, 1], got {prob}.")
    b, _, h, w = x.shape
    dev = x.device
    erase = _rand((b,), generator, dev) < prob  # (B,)
    area = _uniform(scale[0], scale[1], b, generator, dev) * (h * w)  # (B,) pixels
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), b, generator, dev))  # (B,) height / width
    eh = torch.sqrt(area * aspect).round().clamp(1, h)  # (B,)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)  # (B,)
    top = (_rand((b,), generator, dev) * (h - eh + 1)).floor()[:, None, None]  # (B, 1, 1)
    left = (_rand((b,), generator, dev) * (w - ew + 1)).floor()[:, None, None]
    rows = torch.arange(h, device=dev)[None, :, None]  # (1, H, 1)
    cols = torch.arange(w, device=dev)[None, None, :]  # (1, 1, W)
    inside = (rows >= top) & (rows < top + eh[:, None, None]) & (cols >= left) & (cols < left + ew[:, None, None])
    mask = inside & erase[:, None, None]  # (B, H, W)
    return x.masked_fill(mask[:, None], fill)


def mixup_cutmix(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with a shuffled copy of itself; return the mixed batch and soft targets.

    ``y`` is int labels ``(B,)`` or one-hot / soft targets ``(B, num_classes)``. One mixing weight
    ``lam ~ Beta(alpha, alpha)`` per batch (as timm does). With both alphas > 0 each batch uses
    MixUp or CutMix with probability 1/2; with both 0 the batch comes back unchanged with one-hot
    targets. CutMix pastes one box (area ``1 - lam``) at the same place in every image and sets
    ``lam`` to the area actually kept. Soft targets ``(B, num_classes)`` sum to 1 per row.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ConfigError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}.")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if y.ndim == 1:
        targets = F.one_hot(y.long(), num_classes).to(dtype)  # (B, K)
    elif y.ndim == 2 and y.shape[1] == num_classes:
        targets = y.to(dtype)
    else:
        raise ConfigError(f"targets must be labels (B,) or (B, {num_classes}), got shape {tuple(y.shape)}.")
    if (mixup_alpha == 0 and cutmix_alpha == 0) or x.shape[0] < 2:
        return x, targets
    # torch has no Beta sampler that takes a generator: seed a numpy one from the torch generator,
    # so every draw still follows the generator's state.
    where = generator.device if generator is not None else x.device
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator, device=where)))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)  # (B,) partner of each image
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        mixed = x.clone()
        mixed[..., y0:y1, x0:x1] = x[..., y0:y1, x0:x1][perm]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        mixed = lam * x + (1.0 - lam) * x[perm]
    return mixed, lam * targets + (1.0 - lam) * targets[perm]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (0-255) or float images in [0, 1], ``(..., C, H, W)`` -> float32 ``(x - mean) / std``.

    ``mean``/``std`` are per channel in [0, 1] units (:attr:`DatasetSplits.mean`), on any device.
    """
    if not isinstance(std, torch.Tensor) and any(float(v) <= 0 for v in std):
        # Checked on the host values: a check on a device tensor would stall every batch.
        raise ConfigError(f"std must be positive in every channel, got {list(std)}.")
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (xf - m) / s
