"""The one door for untrusted image bytes: decode safely, normalise modes, fit and preprocess.

Everything a user hands us (CLI paths, dashboard uploads) goes through :func:`open_image`, which
returns a fully loaded RGB ``PIL.Image`` or raises :class:`~vitviz.errors.InvalidImageError` with a
message that says what was wrong and what to do. :func:`fit_image` produces exactly the square the
model sees (so overlays can be drawn on it) and :func:`preprocess` turns images into the
normalised batch a model takes.

Accepted formats: :data:`SUPPORTED_FORMATS` (the ones we promise and test) plus
:data:`EXTRA_FORMATS` (AVIF when this Pillow was built with libavif; ICO and PPM/PGM/PBM, whose
decoders are small and self-contained). Camera JPEGs that Pillow reports as "MPO" come in through
the JPEG decoder. Everything else is refused *before* any plugin parses it; in particular EPS,
which Pillow renders by running Ghostscript, never gets near a decoder.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vitviz.errors import InvalidImageError

__all__ = [
    "EXTRA_FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SUPPORTED_FORMATS",
    "fit_image",
    "open_image",
    "preprocess",
    "to_rgb",
]

SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
EXTRA_FORMATS: tuple[str, ...] = ("AVIF", "ICO", "PPM")
_WHAT_TO_DO = "upload a PNG, JPEG, WebP, BMP, GIF or TIFF"

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO


class _PreprocessMeta(Protocol):
    """Anything carrying preprocessing settings, e.g. :class:`vitviz.checkpoint.CheckpointMeta`."""

    img_size: int
    mean: Sequence[float]
    std: Sequence[float]


# --------------------------------------------------------------------------------------------------
# open_image


def open_image(
    source: ImageSource,
    *,
    max_pixels: int = 64_000_000,
    max_side: int = 20_000,
) -> Image.Image:
    """Decode untrusted image bytes, a path or a binary file object into a loaded RGB image.

    The first frame of animations and multi-page files is taken, EXIF orientation is applied,
    transparency is composited onto white, and CMYK, palette, 1-bit, 16-bit and float images are
    converted to 8-bit RGB (see :func:`to_rgb`). Dimensions are checked from the header, before any
    pixel is decoded: either side over ``max_side`` or more than ``max_pixels`` pixels is refused,
    as is anything Pillow's own decompression-bomb guard warns about.

    Raises:
        InvalidImageError: the input is missing, empty, not an accepted image, truncated or too big.
    """
    name = _describe_source(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InvalidImageError(f"{name} is empty (0 bytes): {_WHAT_TO_DO}.")
        return _decode(io.BytesIO(data), name, max_pixels, max_side)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InvalidImageError(f"no such file: {path}; check the path and try again.")
        if path.is_dir():
            raise InvalidImageError(f"{path} is a directory, not an image file: {_WHAT_TO_DO}.")
        try:
            with open(path, "rb") as fp:
                if os.fstat(fp.fileno()).st_size == 0:
                    raise InvalidImageError(f"{name} is empty (0 bytes): {_WHAT_TO_DO}.")
                # Decoding happens inside the `with`, and the result is always a fresh image, so
                # nothing we return keeps the file open.
                return _decode(fp, name, max_pixels, max_side)
        except OSError as err:
            raise InvalidImageError(f"cannot read {path}: {err.strerror or err}.") from err
    if hasattr(source, "read"):
        fp = source
        if not _seekable(fp):
            # Pillow must seek (headers are read twice); buffer streams such as sockets or pipes.
            fp = io.BytesIO(fp.read())
        start = fp.tell()
        fp.seek(0, os.SEEK_END)
        empty = fp.tell() == start
        fp.seek(start)
        if empty:
            raise InvalidImageError(f"{name} is empty (0 bytes): {_WHAT_TO_DO}.")
        if start:
            # Pillow seeks to 0 of the object it is given; honour a caller's current position.
            fp = io.BytesIO(fp.read())
        return _decode(fp, name, max_pixels, max_side)
    raise InvalidImageError(
        f"cannot read an image from a {type(source).__name__}; pass bytes, a file path or a binary "
        "file object (open(path, 'rb'))."
    )


def _decode(fp: BinaryIO, name: str, max_pixels: int, max_side: int) -> Image.Image:
    """Open, check, fully load and convert one image from a seekable binary file."""
    # Turning the warning into an error makes Pillow's bomb guard a refusal rather than a log line.
    # catch_warnings is process-global, so the explicit MAX_IMAGE_PIXELS check below is what keeps
    # the guard in force when another thread (Streamlit runs several) is inside a catch_warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp, formats=_accepted_formats())
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _bomb(name) from err
        except UnidentifiedImageError as err:
            fp.seek(0)
            hint = _sniff(fp.read(512))
            raise InvalidImageError(f"{name} is not an image vitviz can open ({hint}): {_WHAT_TO_DO}.") from err
        except Exception as err:  # any parser failure on untrusted bytes is a bad file, not a crash
            # The decoder's words stay in the chained cause (the server log), not in what the user reads.
            raise InvalidImageError(
                f"{name} is not an image vitviz can open (its beginning is damaged): {_WHAT_TO_DO}."
            ) from err

        try:
            _check_size(img.size, name, max_pixels, max_side)
            try:
                img.load()  # decodes the first frame only; later frames are never touched
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise _bomb(name) from err
            except Exception as err:
                raise InvalidImageError(
                    f"{name} is an incomplete or damaged {img.format} file (cut short, or its pixels are "
                    "corrupt); re-export or re-download the image and try again."
                ) from err
            try:
                img = _exif_upright(img)
                return to_rgb(img)
            except InvalidImageError:
                raise
            except Exception as err:
                raise InvalidImageError(
                    f"{name} uses a colour format vitviz cannot turn into ordinary RGB colours: {_WHAT_TO_DO}."
                ) from err
        finally:
            img.close()


def _accepted_formats() -> tuple[str, ...]:
    # Image.open looks formats up in Image.OPEN; one missing from this build (AVIF without libavif)
    # would be a KeyError, so keep only the registered ones.
    Image.init()
    return tuple(f for f in SUPPORTED_FORMATS + EXTRA_FORMATS if f in Image.OPEN)


def _check_size(size: tuple[int, int], name: str, max_pixels: int, max_side: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise InvalidImageError(f"{name} has no pixels ({w}x{h}): {_WHAT_TO_DO}.")
    if w > max_side or h > max_side:
        raise InvalidImageError(
            f"{name} is {w}x{h} pixels; a side longer than {max_side} is refused. "
            "Downscale the image and try again."
        )
    if w * h > max_pixels:
        raise InvalidImageError(
            f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}. "
            "Downscale the image and try again."
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise _bomb(name, f"{w}x{h} = {w * h:,} pixels, over the safety limit of {limit:,}")


def _bomb(name: str, detail: str | None = None) -> InvalidImageError:
    """A file that claims more pixels than is safe to decode (a "decompression bomb" fills memory)."""
    detail = detail or "it claims far more pixels than a picture needs"
    return InvalidImageError(f"{name} is too large to open safely ({detail}). Downscale the image and try again.")


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a damaged EXIF block leaves the pixels as stored."""
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:
        # Bad metadata is no reason to refuse good pixels.
        return img
    return upright if upright is not None else img


def _describe_source(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "the image data"
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    name = getattr(source, "name", None)
    # Uploaded files (Streamlit's UploadedFile, open()) carry a name; say which upload failed.
    return repr(name) if isinstance(name, str) and name else "the image data"


def _seekable(fp: Any) -> bool:
    try:
        if hasattr(fp, "seekable"):
            return bool(fp.seekable())
        fp.seek(0, os.SEEK_CUR)
        return True
    except (OSError, AttributeError, ValueError):
        return False


def _sniff(head: bytes) -> str:
    """A short guess at what non-image bytes are, for the error message."""
    stripped = head.lstrip().lower()
    if not head:
        return "it is empty"
    if stripped.startswith((b"<svg", b"<?xml")) or b"<svg" in stripped:
        return "it looks like SVG/XML text; vector images must be rasterised first"
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "it looks like an HTML page, not the image itself"
    if head.startswith(b"%PDF"):
        return "it is a PDF document"
    if head.startswith(b"%!PS") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        return "it is PostScript/EPS, which vitviz does not render"
    if head[4:8] == b"ftyp":
        return "it looks like HEIC/HEIF or a video container"
    if head.startswith(b"PK\x03\x04"):
        return "it is a ZIP archive"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "its contents match no picture format vitviz knows"
    return "it is text, not image data"


# --------------------------------------------------------------------------------------------------
# mode conversion


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB deliberately (always returns a new image).

    Transparency (RGBA, LA, PA, palette with a transparent index) is composited onto
    ``background`` using the alpha channel; 16-bit and 32-bit integer images are scaled from
    0..65535 to 0..255 (values outside that range are stretched min-to-max instead); float images
    in [0, 1] are scaled by 255 and others stretched; CMYK, YCbCr, 1-bit, L and palette images go
    through Pillow's converters.
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(img)).convert("RGB")
    if mode == "P":
        palette_mode = getattr(img.palette, "mode", "RGB")
        img = img.convert("RGBA" if "transparency" in img.info or palette_mode == "RGBA" else "RGB")
        mode = img.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise InvalidImageError(
            f"images with colour mode {mode!r} cannot be turned into ordinary RGB colours: {_WHAT_TO_DO}."
        ) from err


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit integer or float image to 0..255 instead of clipping at 255."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = np.isfinite(arr)
        arr = np.where(finite, arr, 0.0)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 65535:
        # The nominal range of 16-bit data (Pillow opens 16-bit PNG/TIFF as I;16 or I).
        return np.round(arr * (255.0 / 65535.0)).astype(np.uint8)
    span = max(hi - lo, 1)
    return np.round((arr - lo) * (255.0 / span)).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# fit_image and preprocess


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop to ``size`` x ``size`` (RGB).

    This is exactly what the model sees, so explanation overlays can be drawn on it. The crop and
    the resize are one bicubic, antialiased resampling of the centred square of the source (Pillow's
    ``box`` argument), which equals resize-then-crop without resampling pixels that are thrown away.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InvalidImageError(f"size must be a positive integer, got {size!r}.")
    size = int(size)
    if not isinstance(image, Image.Image):
        raise InvalidImageError(f"fit_image expects a PIL image, got {type(image).__name__}.")
    rgb = image if image.mode == "RGB" else to_rgb(image)
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    return rgb.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
    )


def preprocess(
    images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
    meta_or_size: _PreprocessMeta | int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Turn images into a normalised float32 batch of shape (B, 3, S, S).

    ``images``: one PIL image, a list of PIL images or arrays, one uint8 array (H, W, 3) or (H, W),
    or a uint8 batch (B, H, W, 3). ``meta_or_size``: a checkpoint meta (anything with ``img_size``,
    ``mean`` and ``std``) or an int size; explicit ``mean``/``std`` override the meta's and default
    to ImageNet's. Each image goes through :func:`fit_image`, is scaled to [0, 1] and normalised.
    """
    if isinstance(meta_or_size, (int, np.integer)) and not isinstance(meta_or_size, bool):
        size, meta_mean, meta_std = int(meta_or_size), None, None
    elif hasattr(meta_or_size, "img_size"):
        size = meta_or_size.img_size
        meta_mean, meta_std = getattr(meta_or_size, "mean", None), getattr(meta_or_size, "std", None)
    else:
        raise InvalidImageError(
            "preprocess needs a checkpoint meta (with img_size, mean, std) or an int image size, "
            f"got {type(meta_or_size).__name__}."
        )
    mean_t = _channel_stats("mean", mean if mean is not None else meta_mean, IMAGENET_MEAN)
    std_t = _channel_stats("std", std if std is not None else meta_std, IMAGENET_STD)
    if bool((std_t <= 0).any()):
        raise InvalidImageError(f"std must be positive in every channel, got {std_t.tolist()}.")

    if _already_fitted(images, size):  # uint8 RGB at the model's size: no trip through PIL
        fitted = [images] if images.ndim == 3 else list(images)
    else:
        fitted = [np.asarray(fit_image(im, size)) for im in _as_pil_list(images)]
    batch = torch.from_numpy(np.stack(fitted)).permute(0, 3, 1, 2).float().div_(255.0)  # (B,3,S,S)
    return batch.sub_(mean_t.view(1, 3, 1, 1)).div_(std_t.view(1, 3, 1, 1))


def _channel_stats(name: str, value: Sequence[float] | None, default: tuple[float, ...]) -> torch.Tensor:
    values = default if value is None else tuple(float(v) for v in value)
    if len(values) != 3:
        raise InvalidImageError(f"{name} needs one value per RGB channel (3), got {list(values)}.")
    return torch.tensor(values, dtype=torch.float32)


def _already_fitted(images: Any, size: int) -> bool:
    """Whether ``images`` is one (S, S, 3) or a batch (B, S, S, 3) of uint8 RGB at side ``size``."""
    return (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4)
            and images.shape[-3:] == (size, size, 3))


def _as_pil_list(images: Any) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [_array_to_pil(a) for a in images]
        return [_array_to_pil(images)]
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidImageError("preprocess got an empty list of images; pass at least one.")
        out = []
        for item in images:
            if isinstance(item, Image.Image):
                out.append(item)
            elif isinstance(item, np.ndarray):
                out.append(_array_to_pil(item))
            else:
                raise InvalidImageError(
                    f"preprocess takes PIL images or uint8 arrays, got a {type(item).__name__} in the list."
                )
        return out
    raise InvalidImageError(
        f"preprocess takes a PIL image, a uint8 array or a list of them, got {type(images).__name__}; "
        "decode files with vitviz.open_image first."
    )


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise InvalidImageError(
            f"image arrays must be uint8 in 0..255, got {arr.dtype}; "
            "convert with (x * 255).round().astype(np.uint8) for floats in [0, 1]."
        )
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr))  # mode L
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr))  # mode RGB or RGBA
    raise InvalidImageError(
        f"image arrays must be (H, W), (H, W, 3), (H, W, 4) or a batch (B, H, W, 3); got shape {arr.shape}."
    )


def fit_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Crop and resize a bool mask exactly as :func:`vitviz.images.fit_image` does its image.

    The centred square is resampled bilinearly and kept where at least half covered, as
    ``vitviz.data`` resizes masks, so the mask lines up with the pixels the model sees.
    """
    m = np.asarray(mask, dtype=np.float32)
    h, w = m.shape
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    img = Image.fromarray(m, mode="F")
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(out) >= 0.5


def nearest_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, C) -> (H, W, C) by repeating cells (nearest neighbour), so each cell stays a crisp square."""
    rows = np.minimum((np.arange(size[0]) * image.shape[0]) // size[0], image.shape[0] - 1)
    cols = np.minimum((np.arange(size[1]) * image.shape[1]) // size[1], image.shape[1] - 1)
    return image[rows][:, cols]
