"""phi4mm.inputs.image against transformers 5.17 `Phi4MultimodalImageProcessor` (the oracle), plus every
load_image input path and its bad-input errors. Real media: two small photos in tests/data and PIL-rendered text.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from phi4mm.inputs.image import (
    CROP_SIZE,
    MASK_SIZE,
    ImageError,
    ImageInputs,
    choose_crop_grid,
    load_image,
    num_image_tokens,
    preprocess_images,
)
from tests.conftest import scene

DATA = Path(__file__).parents[1] / "data"

# The crops match the oracle bit for bit: the HD resize runs the same torch uint8 kernel torchvision v2 calls,
# and normalisation uses the same float32 arithmetic. The bicubic global view applies the same weights
# (-3, 19, 19, -3)/32 as two separable passes (rows, then a banded product over columns: ~2x faster on one
# core), so its float32 sums round in another order: within 2.4e-7 on [-1, 1] values, never more than 1e-6.
PIXEL_ATOL = 1e-6


@pytest.fixture(scope="module")
def oracle():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    return transformers.Phi4MultimodalImageProcessor()   # defaults: dynamic_hd 36, 448 crops, mean=std=0.5


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _assert_matches_oracle(oracle, images: list[Image.Image]) -> ImageInputs:
    ref = oracle(images=images, return_tensors="pt")
    ours = preprocess_images(images)
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref["image_pixel_values"].shape
    diff = (ours.pixel_values - ref["image_pixel_values"]).abs().max().item()
    assert diff <= PIXEL_ATOL, f"pixel values differ by {diff}"
    assert torch.equal(ours.pixel_values[:, 1:], ref["image_pixel_values"][:, 1:])  # crops: bit for bit
    assert ours.attention_mask.dtype == torch.long
    # HF returns a float32 mask of 0/1; ours is int64 with identical values.
    assert torch.equal(ours.attention_mask, ref["image_attention_mask"].long())
    assert ours.image_sizes.dtype == torch.long
    assert torch.equal(ours.image_sizes, ref["image_sizes"])
    assert ours.num_tokens == [int(t) for t in ref["num_img_tokens"]]
    for image, n in zip(images, ours.num_tokens):
        assert num_image_tokens(image.width, image.height) == n
    return ours


# ---- parity on sizes ---------------------------------------------------------------------------------------------
PARITY_SIZES = [
    (10, 10), (16, 2000), (2000, 16), (448, 448), (896, 896), (4000, 3000), (640, 480), (1000, 700),
    (3000, 400), (200, 3000), (449, 449), (1344, 1344), (447, 100), (17, 17), (100, 447), (1, 9),
    (2689, 2689), (1800, 1800), (3584, 1700), (5000, 20), (20, 5000), (1920, 1080), (1080, 1920), (462, 14),
    (800, 9), (9, 800), (333, 777),
]


@pytest.mark.parametrize("size", PARITY_SIZES, ids=[f"{w}x{h}" for w, h in PARITY_SIZES])
def test_single_image_matches_oracle(oracle, size):
    _assert_matches_oracle(oracle, [_noise(*size)])


def test_batch_matches_oracle(oracle):
    # Different crop counts: padding crops are zero pixels with all-ones masks.
    images = [_noise(640, 480), _noise(16, 2000), _noise(1000, 700), _noise(10, 10)]
    ours = _assert_matches_oracle(oracle, images)
    assert ours.pixel_values.shape == (4, 7, 3, CROP_SIZE, CROP_SIZE)   # 1000x700 -> 3x2 grid + global
    assert ours.pixel_values[0, 5:].abs().sum() == 0 and bool((ours.attention_mask[0, 5:] == 1).all())


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 2), (2, 4), (4, 4), (1, 6), (6, 3)])
def test_global_view_equals_bicubic_of_the_whole_canvas(rows, cols):
    """The gathered uint8 taps + the two integer passes give torch's bicubic of the whole normalised canvas."""
    from phi4mm.inputs.image import global_taps, global_view
    canvas = torch.randint(0, 256, (3, rows * CROP_SIZE, cols * CROP_SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(rows))
    ref = torch.nn.functional.interpolate((canvas.float()[None] - 127.5) / 127.5, size=(CROP_SIZE, CROP_SIZE),
                                          mode="bicubic", align_corners=False)[0]
    r, c = global_taps(rows), global_taps(cols)
    small = canvas if r is None else canvas.index_select(1, r)
    small = (small if c is None else small.index_select(2, c)).contiguous()
    out = torch.empty(3, CROP_SIZE, CROP_SIZE)
    global_view(small, out)
    assert (out - ref).abs().max().item() <= PIXEL_ATOL


def test_digest_covers_each_canvas_and_plan_in_order():
    a, b = scene(700, 500, 1), scene(700, 500, 2)
    d = [preprocess_images(x).digest for x in ([a], [a], [b], [a, b], [b, a])]
    assert d[0] == d[1] and len(set(d[1:])) == 4
    # The same pixels on another plan (dynamic_hd changes the crop grid) are other inputs.
    assert preprocess_images([a], dynamic_hd=1).digest != d[0]


@pytest.mark.parametrize("size", [(1, 2000), (2000, 1), (3, 2000), (5000, 4)])
def test_extreme_aspect_is_a_clear_error(oracle, size):
    # The reference raises "aspect ratio is very extreme" when the image resized into its grid is under 10 px
    # thin (1x2000 -> 1x2240). Blowing one pixel up to 10 would be invented data, so we refuse too, with a
    # message that says what to do. 16x2000 text strips survive (resized 17x2240), see the parity sizes.
    with pytest.raises(ValueError, match="extreme"):
        oracle(images=[_noise(*size)], return_tensors="pt")
    with pytest.raises(ImageError, match="aspect ratio") as info:
        preprocess_images([_noise(*size)])
    assert f"{size[0]}x{size[1]}" in str(info.value)
    with pytest.raises(ImageError):
        num_image_tokens(*size)


def _grid_sweep_sizes() -> list[tuple[int, int]]:
    rng = np.random.default_rng(1234)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 9000, (150, 2))]
    # Exact-aspect families hit the tie rule (several grids with identical aspect); thin strips hit (36,1).
    for side in (2689, 3000, 4480, 8000):
        sizes += [(side, side), (2 * side, side), (side, 3 * side), (3 * side // 2, side)]
    sizes += [(20000, 100), (100, 20000), (30000, 1000), (2700, 2699), (6000, 6001), (300, 9000)]
    return sizes


def test_grid_choice_matches_oracle_sweep(oracle):
    # The oracle's dynamic_preprocess on a meta tensor gives its grid and its extreme-aspect decision for
    # any size without touching pixels.
    for width, height in _grid_sweep_sizes():
        meta = torch.empty(3, height, width, dtype=torch.uint8, device="meta")
        try:
            padded, _ = oracle.dynamic_preprocess(meta, CROP_SIZE, 14, MASK_SIZE, max_num=36)
        except ValueError:
            with pytest.raises(ImageError):
                num_image_tokens(width, height)
            continue
        cols, rows = choose_crop_grid(width, height)
        assert (rows * CROP_SIZE, cols * CROP_SIZE) == tuple(padded.shape[-2:]), (width, height)
        num_image_tokens(width, height)   # must not raise where the oracle does not


# ---- token counts (measured with the HF 5.17 processor) ---------------------------------------------------------
@pytest.mark.parametrize("size,tokens", [
    ((448, 448), 545), ((896, 896), 1329), ((640, 480), 1065), ((1000, 700), 1777),
    ((3000, 400), 1968), ((200, 3000), 1281), ((2688, 2688), 9585), ((6 * 448 + 1, 6 * 448 + 1), 9585),
])
def test_token_count_table(size, tokens):
    assert num_image_tokens(*size) == tokens


def test_token_count_maximum(oracle):
    # The often quoted 9585 is the 6x6 maximum; a 1x36 grid has more tokens, because every one of its 576 pooled
    # rows ends with a sub_GN separator: 273 + 16*576 + 576 = 10065. The oracle agrees (448x16128 image).
    grids = [(i, j) for i in range(1, 37) for j in range(1, 37) if i * j <= 36]
    assert max(num_image_tokens(CROP_SIZE * i, CROP_SIZE * j) for i, j in grids) == 10065
    assert num_image_tokens(20000, 20000) == 9585
    tall = Image.new("RGB", (CROP_SIZE, 36 * CROP_SIZE), (10, 20, 30))
    assert oracle(images=[tall], return_tensors="pt")["num_img_tokens"].tolist() == [10065]
    rng = np.random.default_rng(7)
    assert max(num_image_tokens(int(w), int(h)) for w, h in rng.integers(100, 20000, (300, 2))) <= 10065


def test_token_count_other_dynamic_hd():
    # vLLM's early code used 16 crops; the count must follow the cap.
    assert num_image_tokens(4000, 4000, dynamic_hd=16) == 256 + 16 + 1 + 64 * 64 + 64   # 4x4 crops, 64x64 pooled
    assert choose_crop_grid(4000, 4000, dynamic_hd=16) == (4, 4)


# ---- real media --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["coffee_300x200.jpg", "astronaut_192.jpg"])
def test_real_photo_matches_oracle(oracle, name):
    photo = load_image(DATA / name)
    assert photo.mode == "RGB"
    _assert_matches_oracle(oracle, [photo])
    # A phone-sized upscale exercises the antialiased downscale path on natural content.
    big = photo.resize((photo.width * 10, photo.height * 10), Image.BICUBIC)
    _assert_matches_oracle(oracle, [big])


def _render_text(text: str, size: tuple[int, int], font_size: int = 14) -> Image.Image:
    image = Image.new("RGB", size, "white")
    font = ImageFont.load_default(size=font_size)
    ImageDraw.Draw(image).text((2, 1), text, fill="black", font=font)
    return image


def test_rendered_text_matches_oracle(oracle):
    line = _render_text("Invoice #4711: total due 1,234.56 EUR by 2025-03-01. " * 4, (2000, 16), font_size=12)
    page = _render_text("Phi-4-multimodal reads text\nin images, line by line.", (600, 120), font_size=24)
    column = _render_text("A\nB\nC", (16, 2000), font_size=12)
    _assert_matches_oracle(oracle, [line, page, column])


# ---- load_image formats ------------------------------------------------------------------------------------------
def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: orientation is visible."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_exif_rotated_jpeg_is_upright():
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 CW to display"
    img = load_image(_encode(_halves(), "JPEG", quality=95, exif=exif))
    assert img.size == (20, 40)
    arr = np.asarray(img).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60   # old left (red) is now on top
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


@pytest.mark.parametrize("fmt,kwargs", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_roundtrip(fmt, kwargs):
    src = _noise(23, 17)
    img = load_image(_encode(src, fmt, **kwargs))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(src))


def test_rgba_and_la_composite_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0                                   # fully transparent black -> white
    rgba[0, 0] = (0, 0, 0, 255)                       # opaque black stays black
    rgba[1, 1] = (0, 0, 0, 128)                       # half transparent black -> mid grey
    img = np.asarray(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (img[3, 3] == 255).all() and (img[0, 0] == 0).all() and abs(int(img[1, 1, 0]) - 127) <= 1
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert (np.asarray(load_image(_encode(la, "PNG"))) == 255).all()
    assert (np.asarray(load_image(rgba)) [3, 3] == 255).all()   # HxWx4 array path too


def test_palette_with_transparency_png_and_gif():
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    pal.putpixel((0, 0), 0)
    for fmt in ("PNG", "GIF"):
        img = np.asarray(load_image(_encode(pal, fmt, transparency=0)))
        assert tuple(img[0, 0]) == (255, 255, 255), fmt    # transparent index -> white
        assert tuple(img[3, 3]) == (255, 0, 0), fmt


def test_gif_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = _encode(red, "GIF", save_all=True, append_images=[blue], duration=100)
    assert tuple(np.asarray(load_image(data))[4, 4]) == (255, 0, 0)


def test_cmyk_tiff_and_jpeg():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))   # pure red in PIL's naive CMYK model
    assert tuple(np.asarray(load_image(_encode(cmyk, "TIFF")))[2, 2]) == (255, 0, 0)
    px = np.asarray(load_image(_encode(cmyk, "JPEG", quality=95))).astype(int)[2, 2]
    assert px[0] > 230 and px[1] < 30 and px[2] < 30


def test_sixteen_bit_grayscale_is_scaled():
    arr = np.zeros((4, 8), np.uint16)
    arr[:, :4], arr[:, 4:] = 65535, 32768
    src = Image.fromarray(arr)                          # mode I;16
    for data in (_encode(src, "PNG"), _encode(src, "TIFF")):
        img = np.asarray(load_image(data))
        assert img.shape == (4, 8, 3)
        assert (img[:, :4] == 255).all() and (img[:, 4:] == 128).all()


def test_other_input_kinds(tmp_path):
    src = _noise(12, 9)
    expect = np.asarray(src)
    png = _encode(src, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    for given in (src, png, bytearray(png), memoryview(png), str(path), path, url, expect):
        assert np.array_equal(np.asarray(load_image(given)), expect), type(given)
    gray = np.asarray(load_image(expect[..., 0]))
    assert gray.shape == (9, 12, 3) and np.array_equal(gray[..., 1], expect[..., 0])
    assert load_image(Image.new("L", (3, 3), 7)).mode == "RGB"


# ---- bad input ---------------------------------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny IDAT: a decompression bomb's calling card."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("bad,match", [
    (b"", "empty"),
    (b"this is certainly not an image", "unrecognised"),
    (_png_header_only(100_000, 100_000), "decompression-bomb|max_pixels"),   # 1e10 px: over PIL's own limit too
    (_png_header_only(10_000, 9_000), "max_pixels"),                        # 9e7 px: ours fires first
    ("data:image/png;base64,!!!not base64!!!", "base64"),
    ("data:image/png,rawpixels", "base64"),
    ("data:image/png;base64", "separat"),
    ("/no/such/file.png", "does not exist"),
    ("https://example.com/cat.png", "network"),
    (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((0, 4, 3), np.uint8), "zero size"),
    (np.zeros((4, 4, 2), np.uint8), "HxW"),
    (12345, "cannot load"),
])
def test_bad_input_raises_clear_error(bad, match):
    with pytest.raises(ImageError, match=match):
        load_image(bad)


def test_truncated_png():
    data = _encode(_noise(64, 64), "PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_max_pixels_and_zero_size():
    with pytest.raises(ImageError, match="max_pixels=5,000"):
        load_image(_encode(_noise(100, 100), "PNG"), max_pixels=5_000)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(_noise(100, 100), max_pixels=5_000)
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError):
        preprocess_images([])
    with pytest.raises(ImageError, match="load_image"):
        preprocess_images([np.zeros((4, 4, 3), np.uint8)])


def test_preprocess_converts_non_rgb_like_load_image():
    rgba = Image.new("RGBA", (50, 30), (0, 0, 0, 0))
    out = preprocess_images([rgba])
    assert torch.equal(out.pixel_values[0, 1], torch.ones(3, CROP_SIZE, CROP_SIZE))   # white -> 1.0 everywhere
