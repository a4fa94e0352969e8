"""One image in, one clean RGB image out: decode, orient, convert, filter, resize, encode.

Semantics of the resize modes follow img2dataset, so users switching over get the same shards:
``center_crop`` (short side to size, centre square), ``keep_ratio`` (short side to size),
``border`` (long side to size, padded to a square), ``none``.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmpretrain.errors import SampleError

RESIZE_MODES = ("center_crop", "keep_ratio", "border", "none")
ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# Largest side each encoder accepts (JPEG: 65,535; WebP: 16,383); PNG is held to JPEG's.
MAX_OUTPUT_SIDE = {"jpg": 65_500, "png": 65_500, "webp": 16_383}
# Pillow's own default limit (about 89.5 megapixels); beyond it a tiny file can expand to gigabytes.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: str = "center_crop"
    resize_only_if_bigger: bool = False
    min_size: int = 0  # inputs whose short side is below this fail with "too_small"
    max_aspect_ratio: float = 0.0  # long/short above this fails with "aspect_ratio"; 0 = off
    encode_format: str = "jpg"
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    border_color: tuple[int, int, int] = (255, 255, 255)


@dataclass
class ProcessedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


def process_image(data: bytes, opts: ImageOptions) -> ProcessedImage:
    """Raises SampleError with a stable reason for every way an input image can be unusable."""
    if not data:
        raise SampleError("empty_file", "0 bytes")
    img = _open(data, opts.max_pixels)
    orientation = _orientation(img)
    w, h = img.size
    original_size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # as a viewer shows it
    _check_filters(original_size, opts)  # before decoding: a filtered image costs only its header
    _draft(img, opts)
    try:
        img.load()
        if orientation != 1:  # exif_transpose copies the whole image even when there is nothing to do
            img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _decode_failure(e) from None
    img = to_rgb(img)
    img = resize(img, opts)
    out = io.BytesIO()
    fmt = ENCODE_FORMATS[opts.encode_format]
    try:
        img.save(out, fmt, **({} if fmt == "PNG" else {"quality": opts.quality}))
    except (OSError, ValueError) as e:
        raise SampleError("encode_error", f"{fmt} encoder refused {img.width}x{img.height}: {e}") from None
    ow, oh = original_size
    return ProcessedImage(out.getvalue(), opts.encode_format, img.width, img.height, ow, oh)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    # Pillow refuses images over 2x its global limit before we could apply ours; lift it to ours.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SampleError("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        raise SampleError("not_an_image", f"{len(data)} bytes that no image decoder recognises") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise _decode_failure(e) from None
    w, h = img.size
    if w * h > max_pixels:
        raise SampleError(
            "decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds the limit {max_pixels} (--max-pixels)"
        )
    if w == 0 or h == 0:
        raise SampleError("decode_error", f"image has a zero dimension ({w}x{h})")
    return img


def _decode_failure(e: Exception) -> SampleError:
    # Pillow says "image file is truncated" when the data ends mid-scan and "Truncated File Read"
    # when it ends inside the header: both are a cut-off file, not a corrupt one.
    reason = "truncated_image" if "truncated" in str(e).lower() else "decode_error"
    return SampleError(reason, str(e) or type(e).__name__)


def _draft(img: Image.Image, opts: ImageOptions) -> None:
    """JPEG DCT-domain downscaling (1/2, 1/4, 1/8) before decode: several times faster when the
    output is much smaller than the source. The draft never goes below the size the resize needs."""
    if img.format != "JPEG" or opts.resize_mode == "none":
        return
    w, h = img.size
    side = min(w, h) if opts.resize_mode in ("center_crop", "keep_ratio") else max(w, h)
    scale = opts.image_size / side
    if scale < 1:
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is ignored, as exif_transpose ignores it
        return 1


def _check_filters(size: tuple[int, int], opts: ImageOptions) -> None:
    short, long = min(size), max(size)
    if opts.min_size and short < opts.min_size:
        raise SampleError("too_small", f"{size[0]}x{size[1]}: short side below --min-size {opts.min_size}")
    if opts.max_aspect_ratio and long / short > opts.max_aspect_ratio:
        raise SampleError(
            "aspect_ratio",
            f"{size[0]}x{size[1]}: aspect ratio above --max-aspect-ratio {opts.max_aspect_ratio}",
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Every Pillow mode to 8-bit RGB; transparency is composited on white, 16-bit is rescaled
    (Pillow's own convert clips 16-bit values at 255, turning most of the image white)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    # Palette, L and RGB images may carry a transparent colour key instead of an alpha band.
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize(img: Image.Image, opts: ImageOptions) -> Image.Image:
    s, (w, h) = opts.image_size, img.size
    resample = Image.Resampling.BICUBIC
    if opts.resize_mode == "none":
        return img
    if opts.resize_mode in ("center_crop", "keep_ratio"):
        if opts.resize_only_if_bigger and min(w, h) <= s:
            return img
        if opts.resize_mode == "center_crop":
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            return img.resize((s, s), resample, box=box)  # crop and resize in one pass
        k = s / min(w, h)
        size = (max(1, round(w * k)), max(1, round(h * k)))
        if max(size) > MAX_OUTPUT_SIDE[opts.encode_format]:
            raise SampleError(
                "aspect_ratio",
                f"{w}x{h} at keep_ratio {s} would be {size[0]}x{size[1]}, beyond what "
                f"{opts.encode_format} can store; filter with --max-aspect-ratio",
            )
        return img.resize(size, resample)
    # border: long side to s (unless only-if-bigger forbids), then pad to s x s, as img2dataset does
    if not (opts.resize_only_if_bigger and max(w, h) <= s):
        k = s / max(w, h)
        img = img.resize((max(1, round(w * k)), max(1, round(h * k))), resample)
    if img.size == (s, s) or img.width > s or img.height > s:
        return img
    canvas = Image.new("RGB", (s, s), opts.border_color)
    canvas.paste(img, ((s - img.width) // 2, (s - img.height) // 2))
    return canvas
