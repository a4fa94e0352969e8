"""process_image() and the caption helpers on hand-built inputs: every test asserts an outcome that
can be computed independently (output size, pixel values against Pillow or arithmetic, reason id)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, JpegImagePlugin

from mmpretrain.errors import SampleError
from mmpretrain.prepare.captions import clean_caption, clean_text, split_document
from mmpretrain.prepare.images import ImageOptions, process_image

BICUBIC = Image.Resampling.BICUBIC
WHITE = (255, 255, 255)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# -- helpers ---------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int64)


def run(data: bytes, **opts) -> tuple[Image.Image, object]:
    """process_image with a lossless output by default, so pixel checks see the pipeline, not JPEG."""
    opts.setdefault("encode_format", "png")
    result = process_image(data, ImageOptions(**opts))
    return decode(result.data), result


def reason_of(data: bytes, **opts) -> str:
    with pytest.raises(SampleError) as info:
        process_image(data, ImageOptions(**opts))
    return info.value.reason


def solid_png(size: tuple[int, int], colour=GREEN) -> bytes:
    return encode(Image.new("RGB", size, colour), "PNG")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte 1-bit PNG whose header claims width x height: a bomb costs nothing to build."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# -- resize modes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, size, expected",
    [
        ("center_crop", (300, 200), (64, 64)),
        ("center_crop", (200, 300), (64, 64)),
        ("keep_ratio", (300, 200), (96, 64)),
        ("keep_ratio", (200, 300), (64, 96)),
        ("border", (300, 200), (64, 64)),
        ("border", (200, 300), (64, 64)),
        ("none", (300, 200), (300, 200)),
        ("none", (200, 300), (200, 300)),
    ],
)
def test_resize_mode_output_size(mode, size, expected):
    out, result = run(solid_png(size), image_size=64, resize_mode=mode)
    assert out.size == expected
    assert (result.width, result.height) == expected
    assert (result.original_width, result.original_height) == size


@pytest.mark.parametrize("size", [(300, 200), (200, 300)])
@pytest.mark.parametrize("colour", [WHITE, (10, 20, 30)])
def test_border_pads_the_short_side_with_the_border_colour(size, colour):
    out, _ = run(solid_png(size, GREEN), image_size=64, resize_mode="border", border_color=colour)
    arr = pixels(out)
    # Long side 300 -> 64, short side 200 -> round(42.67) = 43, pasted at (64 - 43) // 2 = 10.
    pad = arr[:10] if size[0] > size[1] else arr[:, :10]
    far_pad = arr[53:] if size[0] > size[1] else arr[:, 53:]
    content = arr[12:51] if size[0] > size[1] else arr[:, 12:51]
    assert (pad == colour).all() and (far_pad == colour).all()
    assert (content == GREEN).all()


@pytest.mark.parametrize(
    "mode, expected", [("center_crop", (40, 30)), ("keep_ratio", (40, 30)), ("none", (40, 30)), ("border", (64, 64))]
)
def test_resize_only_if_bigger_never_upscales(mode, expected):
    out, _ = run(solid_png((40, 30), GREEN), image_size=64, resize_mode=mode, resize_only_if_bigger=True)
    assert out.size == expected
    arr = pixels(out)
    if mode == "border":  # unscaled 40x30 pasted at ((64 - 40) // 2, (64 - 30) // 2) = (12, 17)
        assert (arr[17:47, 12:52] == GREEN).all()
        mask = np.ones((64, 64), bool)
        mask[17:47, 12:52] = False
        assert (arr[mask] == WHITE).all()
    else:
        assert (arr == GREEN).all()


def test_resize_only_if_bigger_still_downscales():
    out, _ = run(solid_png((300, 200)), image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=True)
    assert out.size == (96, 64)


@pytest.mark.parametrize("size", [(300, 200), (200, 300)])
def test_center_crop_keeps_the_centre(size):
    img = Image.new("RGB", size, BLUE)
    w, h = size
    margin_x, margin_y = (w - min(size)) // 2, (h - min(size)) // 2
    img.paste(RED, (margin_x, margin_y, w - margin_x, h - margin_y))
    out, _ = run(encode(img, "PNG"), image_size=64, resize_mode="center_crop")
    arr = pixels(out)
    # Pillow's box resize lets the bicubic support reach one source pixel past the box, so the
    # outermost output column/row may take a trace of blue; everything inside is pure red.
    assert (arr[..., 0] >= 200).all() and (arr[..., 2] <= 60).all(), "blue margin leaked into the crop"
    assert (arr[1:-1, 1:-1] == RED).all()


def test_center_crop_pixels_match_pillow_reference():
    img = noise((300, 200))
    out, _ = run(encode(img, "PNG"), image_size=64, resize_mode="center_crop")
    reference = img.resize((64, 64), BICUBIC, box=(50, 0, 250, 200))
    assert np.array_equal(pixels(out), pixels(reference))


def test_keep_ratio_pixels_match_pillow_reference():
    img = noise((200, 300), seed=1)
    out, _ = run(encode(img, "PNG"), image_size=64, resize_mode="keep_ratio")
    assert np.array_equal(pixels(out), pixels(img.resize((64, 96), BICUBIC)))


# -- odd but valid inputs --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cmyk, rgb",
    [((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 0, 0), (255, 0, 255)), ((0, 0, 255, 0), (255, 255, 0)),
     ((0, 0, 0, 255), (0, 0, 0)), ((0, 0, 0, 0), (255, 255, 255))],
)
def test_cmyk_jpeg_becomes_plausible_rgb(cmyk, rgb):
    data = encode(Image.new("CMYK", (40, 30), cmyk), "JPEG", quality=95)
    assert decode(data).mode == "CMYK"
    out, _ = run(data, image_size=16, resize_mode="center_crop")
    assert out.mode == "RGB"
    assert np.abs(pixels(out) - rgb).max() <= 6


def test_large_cmyk_jpeg_through_draft_keeps_colour():
    data = encode(Image.new("CMYK", (800, 600), (255, 0, 0, 0)), "JPEG", quality=95)
    out, _ = run(data, image_size=32)
    assert out.size == (32, 32)
    assert np.abs(pixels(out) - (0, 255, 255)).max() <= 6


def test_16bit_grayscale_png_is_rescaled_not_clipped():
    y, x = np.mgrid[0:64, 0:256]
    values = (x * 256 + y * 4).astype(np.uint16)  # 0 .. 65532, every column a different 8-bit level
    data = encode(Image.fromarray(values), "PNG")
    assert decode(data).mode == "I;16"
    out, _ = run(data, resize_mode="none")
    arr = pixels(out)
    assert out.mode == "RGB" and out.size == (256, 64)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert np.abs(arr[..., 0] - values / 257.0).max() <= 1
    for (row, col), level in {(0, 0): 0, (0, 128): 128, (63, 255): 255, (10, 64): 64}.items():
        assert abs(arr[row, col, 0] - level) <= 1


def test_palette_png_with_transparency_composites_on_white():
    img = Image.new("P", (20, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    img.paste(1, (0, 0, 10, 10))  # left half: opaque red; right half: index 0, fully transparent
    data = encode(img, "PNG", transparency=0)
    out, _ = run(data, resize_mode="none")
    arr = pixels(out)
    assert (arr[:, :10] == RED).all()
    assert (arr[:, 10:] == WHITE).all(), "transparent palette entry must become white, not black"


def test_palette_png_with_partial_alpha_table():
    img = Image.new("P", (4, 4), 2)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    data = encode(img, "PNG", transparency=bytes([0, 255, 128]))  # index 2: green at alpha 128
    out, _ = run(data, resize_mode="none")
    expected = np.array([255 * 127 / 255, 255, 255 * 127 / 255])  # green over white at 128/255
    assert np.abs(pixels(out) - expected).max() <= 2


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)])
    out, _ = run(encode(img, "PNG"), resize_mode="none")
    got = pixels(out)[0]
    assert tuple(got[0]) == WHITE
    assert tuple(got[1]) == RED
    assert np.abs(got[2] - (127, 127, 255)).max() <= 1


def test_la_is_composited_on_white():
    img = Image.new("LA", (3, 1))
    img.putdata([(0, 0), (0, 255), (0, 128)])
    out, _ = run(encode(img, "PNG"), resize_mode="none")
    got = pixels(out)[0]
    assert tuple(got[0]) == WHITE and tuple(got[1]) == (0, 0, 0)
    assert np.abs(got[2] - 127).max() <= 1


def test_grayscale_becomes_rgb_with_equal_channels():
    levels = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 64 x 8, every 4th level
    out, _ = run(encode(Image.fromarray(levels, "L"), "PNG"), resize_mode="none")
    arr = pixels(out)
    assert out.mode == "RGB"
    for channel in range(3):
        assert np.array_equal(arr[..., channel], levels)


@pytest.mark.parametrize(
    "orientation, size, corner",
    [(1, (60, 40), "top_left"), (3, (60, 40), "bottom_right"), (6, (40, 60), "top_right"),
     (8, (40, 60), "bottom_left")],
)
def test_exif_orientation_is_applied(orientation, size, corner):
    img = Image.new("RGB", (60, 40), BLUE)
    img.paste(RED, (0, 0, 15, 10))  # the stored top-left corner is red
    data = with_orientation(img, orientation)
    out, result = run(data, resize_mode="none")
    assert out.size == size
    assert (result.original_width, result.original_height) == size
    w, h = out.size
    corners = {"top_left": (2, 2), "top_right": (w - 3, 2), "bottom_left": (2, h - 3), "bottom_right": (w - 3, h - 3)}
    for name, xy in corners.items():
        r, g, b = out.getpixel(xy)
        is_red = r > 200 and b < 60
        assert is_red == (name == corner), f"{name} pixel {r, g, b}"


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotation_with_resize_swaps_output_dims(orientation):
    data = with_orientation(Image.new("RGB", (60, 40), BLUE), orientation)
    out, result = run(data, image_size=20, resize_mode="keep_ratio")
    assert out.size == (20, 30)
    assert (result.original_width, result.original_height) == (40, 60)


# -- JPEG draft ------------------------------------------------------------------------------------
def smooth_photo(size=(2000, 1500)) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, 128 + 100 * np.sin(x / 150) * np.cos(y / 170)], -1)
    img = Image.fromarray(arr.astype(np.uint8))
    ImageDraw.Draw(img).ellipse((700, 400, 1300, 1000), fill=(250, 30, 30))
    return img


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encode(smooth_photo(), "JPEG", quality=90)


def pillow_reference(full: Image.Image, mode: str) -> Image.Image:
    """The same geometry from a full decode, written out by hand (2000 x 1500 at 64)."""
    if mode == "center_crop":
        return full.resize((64, 64), BICUBIC, box=(250, 0, 1750, 1500))
    if mode == "keep_ratio":
        return full.resize((round(2000 * 64 / 1500), 64), BICUBIC)
    canvas = Image.new("RGB", (64, 64), WHITE)
    canvas.paste(full.resize((64, 48), BICUBIC), (0, 8))
    return canvas


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "border"])
def test_jpeg_draft_matches_full_decode(big_jpeg, mode, monkeypatch):
    scales = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, *args, **kwargs):
        result = original_draft(self, *args, **kwargs)
        scales.append(result[1] if result else None)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out, result = run(big_jpeg, image_size=64, resize_mode=mode)
    assert scales and scales[0] is not None, "the draft path was not taken"
    full = decode(big_jpeg).convert("RGB")
    reference = pillow_reference(full, mode)
    assert out.size == reference.size
    assert (result.original_width, result.original_height) == (2000, 1500)
    diff = np.abs(pixels(out) - pixels(reference))
    assert diff.mean() < 8, f"mean abs diff {diff.mean():.2f} of 255"


def test_draft_is_not_used_when_the_output_is_not_smaller(big_jpeg, monkeypatch):
    calls = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, *a, **k: calls.append(a))
    result = process_image(big_jpeg, ImageOptions(image_size=64, resize_mode="none", encode_format="jpg"))
    assert (result.width, result.height) == (2000, 1500) and calls == []


# -- filters and failures --------------------------------------------------------------------------
def test_min_size_filter():
    assert reason_of(solid_png((300, 40)), min_size=50) == "too_small"
    out, _ = run(solid_png((300, 50)), min_size=50, image_size=32)  # equal to the limit passes
    assert out.size == (32, 32)


def test_max_aspect_ratio_filter():
    assert reason_of(solid_png((301, 100)), max_aspect_ratio=3.0) == "aspect_ratio"
    assert reason_of(solid_png((100, 301)), max_aspect_ratio=3.0) == "aspect_ratio"
    out, _ = run(solid_png((300, 100)), max_aspect_ratio=3.0, image_size=32)
    assert out.size == (32, 32)


def test_filters_run_on_the_header_before_decoding():
    truncated = encode(noise((300, 40)), "JPEG")[:-500]
    assert reason_of(truncated, image_size=32) == "truncated_image"
    assert reason_of(truncated, min_size=50) == "too_small"


def test_filters_use_the_oriented_size():
    data = with_orientation(Image.new("RGB", (300, 100), BLUE), 6)  # shown as 100 x 300
    with pytest.raises(SampleError) as info:
        process_image(data, ImageOptions(min_size=120))
    assert info.value.reason == "too_small" and "100x300" in info.value.detail


@pytest.mark.parametrize("side", [30000, 10000])
def test_decompression_bomb_is_refused_from_the_header(side):
    # 30000^2 trips Pillow's own 2x limit inside Image.open; 10000^2 is between 1x and 2x, ours.
    data = png_claiming(side, side)
    assert len(data) < 200
    start = time.perf_counter()
    assert reason_of(data) == "decompression_bomb"
    assert time.perf_counter() - start < 0.5


def test_max_pixels_limit_is_exclusive():
    data = solid_png((100, 100))
    assert reason_of(data, max_pixels=9_999) == "decompression_bomb"
    out, _ = run(data, max_pixels=10_000, image_size=16)
    assert out.size == (16, 16)


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty_file"), (b"hello, this is a text file\n" * 4, "not_an_image")],
)
def test_unusable_bytes(data, reason):
    assert reason_of(data) == reason


def test_truncated_jpeg_body():
    data = encode(noise((120, 100)), "JPEG")
    assert reason_of(data[: len(data) // 2], image_size=32) == "truncated_image"


@pytest.mark.parametrize("cut", [100, 400])
def test_jpeg_truncated_inside_its_header_is_truncated_image(cut):
    # Pillow raises OSError("Truncated File Read") from Image.open here, not "image file is truncated".
    data = encode(noise((120, 100)), "JPEG")
    assert reason_of(data[:cut]) == "truncated_image"


@pytest.mark.parametrize("fmt, size, side", [("jpg", (1000, 1), 70), ("webp", (300, 1), 64)])
def test_extreme_strip_in_keep_ratio_is_a_sample_failure(fmt, size, side):
    with pytest.raises(SampleError, match="aspect_ratio"):
        process_image(solid_png(size), ImageOptions(image_size=side, resize_mode="keep_ratio", encode_format=fmt))


@pytest.mark.parametrize("mode, key", [("L", 0), ("RGB", (0, 0, 0))])
def test_colour_key_transparency_becomes_white(mode, key):
    img = Image.new(mode, (4, 2), key)
    img.putpixel((1, 0), 200 if mode == "L" else (200, 10, 10))
    out, _ = run(encode(img, "PNG", transparency=key), resize_mode="none")
    arr = pixels(out)
    assert (arr[1] == WHITE).all()
    assert tuple(arr[0, 1]) == ((200, 200, 200) if mode == "L" else (200, 10, 10))


# -- encoding --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, pillow_format", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_formats(fmt, pillow_format):
    img = smooth_photo((300, 200))
    result = process_image(encode(img, "PNG"), ImageOptions(image_size=64, encode_format=fmt))
    out = decode(result.data)
    assert result.ext == fmt
    assert out.format == pillow_format and out.mode == "RGB" and out.size == (64, 64)
    reference = img.resize((64, 64), BICUBIC, box=(50, 0, 250, 200))
    tolerance = 0 if fmt == "png" else 6  # lossless is exact, lossy close
    assert np.abs(pixels(out) - pixels(reference)).mean() <= tolerance


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_quality_changes_size(fmt):
    data = encode(noise((128, 128)), "PNG")
    sizes = [len(process_image(data, ImageOptions(image_size=128, encode_format=fmt, quality=q)).data)
             for q in (20, 60, 95)]
    assert sizes[0] < sizes[1] < sizes[2]


# -- captions --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("cafÃ©", "café"),
        ("  a photo\n\tof  a\r\ndog \u00a0 ", "a photo of a dog"),
        ("caf\u00e9".encode(), "café"),
        ("\ufeffa bom".encode(), "a bom"),
        (b"\xef\xbb\xbfa bom in bytes", "a bom in bytes"),
        ("Tom &amp; Jerry", "Tom & Jerry"),
        (42, "42"),
    ],
)
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"caf\xe9", "caption_not_utf8"),
        (b"\xff\xfe\x00a", "caption_not_utf8"),
        ("", "empty_caption"),
        (" \n\t ", "empty_caption"),
        (b"", "empty_caption"),
        (None, "missing_caption"),
    ],
)
def test_clean_caption_failures(raw, reason):
    with pytest.raises(SampleError) as info:
        clean_caption(raw)
    assert info.value.reason == reason


def random_text(rng: np.random.Generator, words: int) -> str:
    out = []
    for _ in range(words):
        word = "".join(rng.choice(list("abcdefghij"), size=int(rng.integers(1, 9))))
        out.append(word + str(rng.choice(["", "", "", ".", "!", "?", ","])))
    return clean_text(" ".join(out))


@pytest.mark.parametrize("max_chars", [9, 10, 13, 40, 200])
@pytest.mark.parametrize("seed", range(4))
def test_split_document_keeps_every_word_in_order(seed, max_chars):
    text = random_text(np.random.default_rng(seed), 120)  # words are at most 8 + 1 characters
    chunks = split_document(text, max_chars)
    assert all(0 < len(c) <= max_chars for c in chunks)
    assert all(c == c.strip() for c in chunks)
    assert " ".join(chunks) == text


def test_split_document_packs_whole_sentences():
    text = "One two three. Four five! Six seven eight nine ten eleven?"
    assert split_document(text, 32) == ["One two three. Four five!", "Six seven eight nine ten eleven?"]
    assert split_document(text, 31) == ["One two three. Four five!", "Six seven eight nine ten", "eleven?"]
    assert split_document(text, 1000) == [text]
    assert split_document("", 10) == []


def test_split_document_cuts_a_word_longer_than_max_chars():
    word = "abcdefghijklmnopqrstuvwxyz"
    assert split_document(word, 10) == ["abcdefghij", "klmnopqrst", "uvwxyz"]
    text = f"a {word} b"
    chunks = split_document(text, 10)
    assert all(len(c) <= 10 for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert chunks == ["a", "abcdefghij", "klmnopqrst", "uvwxyz b"]


@pytest.mark.parametrize("max_chars", [1, 3, 7])
def test_split_document_with_tiny_limits(max_chars):
    text = random_text(np.random.default_rng(9), 60)
    chunks = split_document(text, max_chars)
    assert all(0 < len(c) <= max_chars for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")


def test_clean_text_fast_path_equals_ftfy():
    import random

    import ftfy

    from mmpretrain.prepare.captions import clean_text

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r", "&amp;", "é", "Ã©", "\u201c"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert clean_text(text) == " ".join(ftfy.fix_text(text).split()), text
