"""Tests for vitviz.images: every file is made here with Pillow (or by hand), in memory or tmp_path."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vitviz.errors import InvalidImageError
from vitviz.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SUPPORTED_FORMATS,
    fit_image,
    open_image,
    preprocess,
    to_rgb,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height but whose pixel data is a few zero bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def noise(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# sources


def test_supported_formats_round_trip_from_bytes():
    img = Image.new("RGB", (20, 10), (10, 200, 30))
    assert set(SUPPORTED_FORMATS) == {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}
    for fmt in SUPPORTED_FORMATS:
        out = open_image(encode(img, fmt))
        assert out.mode == "RGB" and out.size == (20, 10), fmt
        # Lossy/paletted formats move colours a little; the image must still be the same colour.
        assert np.abs(pixels(out) - (10, 200, 30)).max() <= 12, fmt


def test_png_is_exact_and_sources_agree(tmp_path):
    img = noise()
    data = encode(img, "PNG")
    path = tmp_path / "noise.png"
    path.write_bytes(data)
    expected = pixels(img)
    with open(path, "rb") as fp:
        from_file = open_image(fp)
    for out in (open_image(data), open_image(bytearray(data)), open_image(memoryview(data)),
                open_image(str(path)), open_image(path), open_image(io.BytesIO(data)), from_file):
        assert out.mode == "RGB"
        np.testing.assert_array_equal(pixels(out), expected)


def test_result_is_detached_from_the_file(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("RGB", (4, 4), RED), "PNG"))
    out = open_image(path)
    path.unlink()  # the returned image must already hold its pixels
    assert out.getpixel((0, 0)) == RED


def test_non_seekable_stream_and_offset_stream():
    data = encode(Image.new("RGB", (5, 5), BLUE), "PNG")

    class Stream:  # a pipe/socket-like object: read() only
        def __init__(self, b: bytes):
            self._buf = io.BytesIO(b)

        def read(self, n: int = -1) -> bytes:
            return self._buf.read(n)

        def seekable(self) -> bool:
            return False

    assert open_image(Stream(data)).getpixel((2, 2)) == BLUE
    shifted = io.BytesIO(b"JUNK" + data)
    shifted.seek(4)
    assert open_image(shifted).getpixel((2, 2)) == BLUE


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InvalidImageError, match="no such file"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(InvalidImageError, match="no such file"):
        open_image(str(tmp_path / "nope.png"))
    with pytest.raises(InvalidImageError, match="directory"):
        open_image(tmp_path)


def test_wrong_source_type():
    with pytest.raises(InvalidImageError, match="bytes, a file path or a binary file"):
        open_image(12345)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("data", [b"", bytearray()])
def test_empty_bytes(data):
    with pytest.raises(InvalidImageError, match="empty"):
        open_image(data)


def test_empty_file_and_stream(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match=r"empty.png.*empty"):
        open_image(path)
    with pytest.raises(InvalidImageError, match="empty"):
        open_image(io.BytesIO())


def test_random_bytes():
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImageError, match="not an image vitviz can open") as info:
        open_image(data)
    assert "upload a PNG, JPEG, WebP, BMP, GIF or TIFF" in str(info.value)


def test_text_svg_pdf_eps_are_refused_with_a_hint(tmp_path):
    cases = {
        "notes.txt": (b"just some text\n", "text"),
        "logo.svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        "doc.pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
        # EPS is a format Pillow *can* open (via Ghostscript); we never let it near a decoder.
        "fig.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "PostScript"),
    }
    for name, (data, hint) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InvalidImageError, match="not an image vitviz can open") as info:
            open_image(path)
        assert name in str(info.value) and hint in str(info.value)


def test_uploaded_file_name_is_in_the_message():
    upload = io.BytesIO(b"not an image at all")
    upload.name = "holiday.jpg"  # Streamlit's UploadedFile carries the client's file name
    with pytest.raises(InvalidImageError, match="holiday.jpg"):
        open_image(upload)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(fmt, tmp_path):
    data = encode(noise(64, 64), fmt)
    with pytest.raises(InvalidImageError, match=f"incomplete or damaged {fmt}"):
        open_image(data[: len(data) // 2])
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(InvalidImageError, match="incomplete"):
        open_image(path)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # we never relax Pillow globally


def test_pillow_bomb_warning_and_error_are_refusals(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn_size = encode(Image.new("RGB", (40, 40)), "PNG")  # 1600 px: Pillow would only warn
    error_size = encode(Image.new("RGB", (50, 50)), "PNG")  # 2500 px > 2 * limit: Pillow raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning may escape either
        for data in (warn_size, error_size):
            with pytest.raises(InvalidImageError, match="too large to open safely"):
                open_image(data)
    # Pillow's own refusal as the cause, so the warning itself (not only our backstop) was the refusal.
    with pytest.raises(InvalidImageError, match="too large to open safely") as info:
        open_image(warn_size)
    assert isinstance(info.value.__cause__, Image.DecompressionBombWarning)
    # catch_warnings is process-global; if another thread's filters win, the explicit check holds.
    monkeypatch.setattr(Image, "_decompression_bomb_check", lambda *a, **k: None)
    with pytest.raises(InvalidImageError, match="over the safety limit of 1,000") as info:
        open_image(warn_size)
    assert info.value.__cause__ is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a user who disabled Pillow's guard
    assert open_image(error_size).size == (50, 50)


def test_pillow_bomb_with_default_limits():
    # 30000 x 30000 = 9e8 pixels, far over Pillow's 2 * 89M error limit; the file is ~100 bytes.
    with pytest.raises(InvalidImageError, match="too large to open safely"):
        open_image(png_header_only(30_000, 30_000), max_side=10**6, max_pixels=10**12)


def _spy_on_decoding(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    original = ImageFile.ImageFile.load

    def load(self):
        calls.append(True)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def test_own_limits_refuse_before_decoding(monkeypatch):
    decoded = _spy_on_decoding(monkeypatch)
    # The headers claim big sizes but carry a few bytes of pixels: decoding would fail as
    # "truncated", so the "limit" message proves the check came first.
    with pytest.raises(InvalidImageError, match="side longer than 20000"):
        open_image(png_header_only(25_000, 2))
    with pytest.raises(InvalidImageError, match="over the limit of 64,000,000"):
        open_image(png_header_only(9_000, 9_000))  # 81M: under Pillow's limit, over ours
    assert decoded == []


def test_limits_are_arguments():
    data = encode(Image.new("RGB", (100, 60)), "PNG")
    with pytest.raises(InvalidImageError, match="over the limit of 5,000"):
        open_image(data, max_pixels=5000)
    with pytest.raises(InvalidImageError, match="longer than 80"):
        open_image(data, max_side=80)
    assert open_image(data, max_pixels=6000, max_side=100).size == (100, 60)


def test_tall_and_large_images_under_the_limits():
    tall = open_image(encode(Image.new("RGB", (8, 6000), GREEN), "PNG"))
    assert tall.size == (8, 6000)
    assert fit_image(tall, 32).size == (32, 32)
    big = open_image(encode(Image.new("L", (4000, 3000), 7), "PNG"))
    assert big.size == (4000, 3000) and big.getpixel((3999, 2999)) == (7, 7, 7)


# ---------------------------------------------------------------------------------------------
# modes


def test_one_bit():
    img = Image.new("1", (8, 4), 0)
    img.paste(1, (0, 0, 4, 4))
    out = open_image(encode(img, "PNG"))
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((7, 0)) == (0, 0, 0)


def test_grayscale_l():
    out = open_image(encode(Image.new("L", (3, 3), 77), "PNG"))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (77, 77, 77)


def test_rgba_composites_onto_white():
    arr = np.zeros((1, 3, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    arr[0, 1] = (0, 0, 255, 255)  # opaque blue stays blue
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = pixels(open_image(encode(Image.fromarray(arr), "PNG")))
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == BLUE
    assert np.all(np.abs(out[0, 2] - 127) <= 1)


def test_la_composites_onto_white():
    arr = np.array([[[90, 0], [90, 255]]], np.uint8)  # (1, 2, 2): L, A
    out = pixels(open_image(encode(Image.fromarray(arr, mode="LA"), "PNG")))
    assert tuple(out[0, 0]) == WHITE and tuple(out[0, 1]) == (90, 90, 90)


def test_palette_with_and_without_transparency():
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    opaque = open_image(encode(img, "PNG"))
    assert opaque.getpixel((0, 0)) == RED and opaque.getpixel((1, 0)) == GREEN
    clear = open_image(encode(img, "PNG", transparency=0))  # index 0 transparent
    assert clear.getpixel((0, 0)) == WHITE and clear.getpixel((1, 0)) == GREEN
    gif = open_image(encode(img, "GIF", transparency=0))
    assert gif.getpixel((0, 0)) == WHITE and gif.getpixel((1, 0)) == GREEN


def test_cmyk_to_rgb():
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    for fmt in ("JPEG", "TIFF"):
        out = pixels(open_image(encode(cyan, fmt)))
        assert np.abs(out[4, 4] - (0, 255, 255)).max() <= 3, fmt


def test_16_bit_grayscale_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535, 1000]], np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        out = pixels(open_image(encode(img, fmt)))[0, :, 0]
        assert out[0] == 0 and out[2] == 255, fmt
        assert abs(out[1] - 128) <= 1, fmt
        assert out[3] == 4, fmt  # 1000 / 257: clipping would have given 255


def test_32_bit_int_and_float_images():
    as_i = Image.fromarray(np.array([[0, 32768, 65535]], np.int32))
    assert as_i.mode == "I"
    np.testing.assert_array_equal(pixels(to_rgb(as_i))[0, :, 0], [0, 128, 255])
    wide = Image.fromarray(np.array([[-100, 0, 100_000]], np.int32))  # outside 16 bits: stretched
    np.testing.assert_array_equal(pixels(open_image(encode(wide, "TIFF")))[0, :, 0], [0, 0, 255])

    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert unit.mode == "F"
    np.testing.assert_array_equal(pixels(open_image(encode(unit, "TIFF")))[0, :, 0], [0, 128, 255])
    other = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], np.float32))
    out = pixels(open_image(encode(other, "TIFF")))[0, :, 0]
    np.testing.assert_array_equal(out[:3], [0, 128, 255])
    assert 0 <= out[3] <= 255  # NaN becomes some valid value, never an error


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = open_image(encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    # After a clockwise quarter turn the stored left (red) is on top, the right (blue) at the bottom.
    assert np.abs(pixels(out)[5, 10] - RED).max() < 40
    assert np.abs(pixels(out)[35, 10] - BLUE).max() < 40


def test_first_frame_of_animations():
    frames = [Image.new("RGB", (6, 6), c) for c in (RED, GREEN, BLUE)]
    for fmt, kwargs in [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})]:
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kwargs)
        probe = Image.open(io.BytesIO(data))
        assert getattr(probe, "n_frames", 1) == 3, fmt  # really multi-frame
        out = open_image(data)
        assert out.size == (6, 6) and np.abs(pixels(out)[3, 3] - RED).max() <= 3, fmt


# ---------------------------------------------------------------------------------------------
# fit_image


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (64, 64), (10, 7)])
def test_fit_image_output_size(size):
    out = fit_image(Image.new("RGB", size, RED), 32)
    assert out.size == (32, 32) and out.mode == "RGB"


def test_fit_image_keeps_the_centre():
    wide = Image.new("RGB", (300, 100), RED)
    wide.paste(GREEN, (100, 0, 200, 100))
    wide.paste(BLUE, (200, 0, 300, 100))
    out = pixels(fit_image(wide, 20))
    assert np.abs(out[1:-1, 1:-1] - GREEN).max() <= 2  # borders may blend a hair across the seam
    tall = wide.transpose(Image.Transpose.ROTATE_90)
    assert np.abs(pixels(fit_image(tall, 20))[1:-1, 1:-1] - GREEN).max() <= 2


def test_fit_image_converts_modes_and_checks_size():
    assert fit_image(Image.new("LA", (10, 10), (0, 0)), 4).getpixel((0, 0)) == WHITE
    with pytest.raises(InvalidImageError, match="positive integer"):
        fit_image(Image.new("RGB", (4, 4)), 0)
    with pytest.raises(InvalidImageError, match="PIL image"):
        fit_image(np.zeros((4, 4, 3), np.uint8), 4)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# preprocess


def _expected_white(mean, std) -> torch.Tensor:
    return (1.0 - torch.tensor(mean)) / torch.tensor(std)


def test_preprocess_shapes_for_every_input_kind():
    img = Image.new("RGB", (40, 30), WHITE)
    arr = np.full((30, 40, 3), 255, np.uint8)
    cases = {
        "pil": (img, 1),
        "list": ([img, img.convert("L")], 2),
        "hw3": (arr, 1),
        "hw": (arr[..., 0], 1),
        "batch": (np.stack([arr, arr, arr]), 3),
        "mixed": ([img, arr], 2),
    }
    for name, (images, batch) in cases.items():
        x = preprocess(images, 16)
        assert x.shape == (batch, 3, 16, 16) and x.dtype == torch.float32, name
        white = _expected_white(IMAGENET_MEAN, IMAGENET_STD)
        torch.testing.assert_close(x[:, :, 5, 5], white.expand(batch, 3))


def test_preprocess_normalisation_values():
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 0, 51, 255  # 0.0, 0.2, 1.0
    x = preprocess(arr, 8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    torch.testing.assert_close(x[0, :, 3, 3], torch.tensor([-1.0, -1.2, 1.0]))
    default = preprocess(arr, 8)
    expected = (torch.tensor([0.0, 0.2, 1.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(default[0, :, 3, 3], expected)


def test_preprocess_reads_meta_and_explicit_stats_override():
    meta = SimpleNamespace(img_size=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = Image.new("RGB", (50, 50), WHITE)
    x = preprocess(img, meta)
    assert x.shape == (1, 3, 24, 24)
    torch.testing.assert_close(x[0, :, 0, 0], torch.ones(3))
    y = preprocess(img, meta, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.testing.assert_close(y[0, :, 0, 0], torch.ones(3))


def test_preprocess_equals_fit_image_pixels():
    img = noise(50, 30)
    x = preprocess(img, 16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    fitted = torch.from_numpy(np.array(fit_image(img, 16))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x[0], fitted)


def test_preprocess_bad_inputs():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(InvalidImageError, match="empty list"):
        preprocess([], 8)
    with pytest.raises(InvalidImageError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), np.float32), 8)
    with pytest.raises(InvalidImageError, match="shape"):
        preprocess(np.zeros((8, 8, 5), np.uint8), 8)
    with pytest.raises(InvalidImageError, match="open_image"):
        preprocess("cat.png", 8)  # type: ignore[arg-type]
    with pytest.raises(InvalidImageError, match="meta"):
        preprocess(img, "224")  # type: ignore[arg-type]
    with pytest.raises(InvalidImageError, match="3"):
        preprocess(img, 8, mean=(0.5, 0.5))
    with pytest.raises(InvalidImageError, match="positive"):
        preprocess(img, 8, std=(0.5, 0.0, 0.5))


def test_preprocess_takes_an_already_fitted_array_without_a_trip_through_pil(monkeypatch):
    import vitviz.images as images

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    expected = images.preprocess(Image.fromarray(arr), 16)
    monkeypatch.setattr(images, "fit_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError("resized")))
    torch.testing.assert_close(images.preprocess(arr, 16), expected)
    batch = np.stack([arr, arr[::-1].copy()])
    assert images.preprocess(batch, 16).shape == (2, 3, 16, 16)
