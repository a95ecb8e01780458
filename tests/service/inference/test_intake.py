"""Image intake: encodings, polarity, pixel arrays, the model's own framing of every image (what
training sees), and refusing bombs before they are decoded."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from model.data import frame_drawings
from model.transform import canonical, ink_maps
from service.errors import ImageTooLarge, InvalidImage
from service.inference import intake as images
from service.inference.intake import ImageLimits, decode, model_inputs, pixel_array

LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=4_000_000)


def drawing(size: int = 105) -> Image.Image:
    img = Image.new("L", (size, size), 255)
    margin, stroke = size // 5, max(1, size // 17)
    ImageDraw.Draw(img).ellipse((margin, margin, size - margin, size - margin), outline=0, width=stroke)
    return img


def b64_file(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def ink_of(image: str | np.ndarray, limits: ImageLimits = LIMITS) -> np.ndarray:
    return ink_maps(decode(image, limits)[None])[0]


def served(*image: str | bytes | np.ndarray) -> np.ndarray:
    """The model inputs the service makes of a request's images."""
    return model_inputs(list(image), LIMITS, 28)


def omniglot_like(height: int = 105, width: int = 105, seed: int = 0) -> np.ndarray:
    """A binary drawing (ink = 1) as Omniglot's: strokes of a few pixels and some dots of the pen
    (3x3: a speck much smaller than a touch of the pen would be dust, which the service leaves out)."""
    rng = np.random.default_rng(seed)
    ink = np.zeros((height, width), dtype=np.uint8)
    ink[height // 4 : 3 * height // 4, width // 2 : width // 2 + 4] = 1
    ink[height // 2 : height // 2 + 3, width // 5 : 4 * width // 5] = 1
    rows = rng.integers(height // 5, height - height // 5 - 2, 30)
    for row, col in zip(rows, rng.integers(width // 5, width - width // 5 - 2, 30), strict=True):
        ink[row : row + 3, col : col + 3] = 1
    return ink


def png_of(ink: np.ndarray, *, light_on_dark: bool = False, mode: str = "1") -> str:
    grey = (255 * (ink if light_on_dark else 1 - ink)).astype(np.uint8)
    return b64_file(Image.fromarray(grey, mode="L").convert(mode))


def test_black_on_white_png_gives_exactly_one_minus_grey() -> None:
    img = drawing()
    expected = 1.0 - np.asarray(img, dtype=np.float32) / 255.0  # model.data's PNG preprocessing
    np.testing.assert_array_equal(ink_of(b64_file(img)), expected)


def test_white_on_black_gives_the_same_ink_as_black_on_white() -> None:
    img = drawing()
    inverted = Image.eval(img, lambda v: 255 - v)
    np.testing.assert_array_equal(ink_of(b64_file(inverted)), ink_of(b64_file(img)))


@pytest.mark.parametrize("light_on_dark", [False, True])
@pytest.mark.parametrize("mode", ["1", "L"])  # Omniglot's 1-bit files (Pillow); 8-bit grey (libspng)
@pytest.mark.parametrize(("height", "width"),
                         [(105, 105), (28, 28), (64, 64), (300, 300), (105, 70), (40, 180)])
def test_an_omniglot_like_png_is_served_as_training_frames_its_ink(
    light_on_dark: bool, mode: str, height: int, width: int,
) -> None:
    ink = omniglot_like(height, width, seed=height + width)
    trained = frame_drawings(ink.astype(np.float32))  # model.data: what training and evaluation see
    np.testing.assert_array_equal(served(png_of(ink, light_on_dark=light_on_dark, mode=mode)), trained[None])


@pytest.mark.parametrize("scale", ["ints", "floats", "floats light on dark"])
def test_a_pixel_array_is_served_as_training_frames_its_ink(scale: str) -> None:
    ink = omniglot_like(60, 45, seed=4)
    rows = {"ints": (255 * (1 - ink)).tolist(), "floats": (1.0 - ink).astype(float).tolist(),
            "floats light on dark": ink.astype(float).tolist()}[scale]
    np.testing.assert_array_equal(served(pixel_array(rows)), frame_drawings(ink.astype(np.float32))[None])


def test_images_of_several_shapes_in_one_request_are_each_served_as_they_are_alone() -> None:
    files = [png_of(omniglot_like(105, 105, seed=1)), png_of(omniglot_like(50, 90, seed=2)),
             png_of(omniglot_like(105, 105, seed=3), light_on_dark=True), pixel_array([[255] * 6] * 5)]
    together = served(*files)
    assert together.shape == (4, 28, 28) and together.dtype == np.float32
    for i, image in enumerate(files):
        np.testing.assert_array_equal(together[i], served(image)[0])
    assert together[:3].max() == pytest.approx(1.0, abs=1e-6) and not together[3].any()  # blank: none


def test_the_glyph_is_framed_wherever_it_sits_in_the_image() -> None:
    ink = omniglot_like(105, 105, seed=5)
    canvas = np.zeros((400, 260), dtype=np.uint8)
    canvas[250:355, 10:115] = ink  # the same drawing in a corner of a larger canvas
    np.testing.assert_allclose(served(png_of(canvas)), served(png_of(ink)), rtol=0, atol=1e-5)


def test_data_url_prefix_is_accepted() -> None:
    plain = b64_file(drawing())
    np.testing.assert_array_equal(ink_of("data:image/png;base64," + plain), ink_of(plain))


def test_strokes_on_a_transparent_canvas_are_put_on_white_paper() -> None:
    img = drawing().convert("RGBA")
    img.putalpha(Image.eval(drawing(), lambda v: 255 - v))
    np.testing.assert_array_equal(ink_of(b64_file(img)), ink_of(b64_file(drawing())))


@pytest.mark.parametrize("pen", [(255, 255, 255), (250, 250, 250), (255, 255, 0)],
                         ids=["white", "near-white", "yellow"])
def test_light_strokes_on_a_transparent_canvas_keep_their_ink(pen: tuple[int, int, int]) -> None:
    """A light pen on a transparent canvas (apps with a dark theme) reads as the same glyph as a
    dark one: white paper would hide a white pen, so it goes on black paper instead."""
    img = Image.new("RGBA", (105, 105), (*pen, 0))
    img.putalpha(Image.eval(drawing(), lambda v: 255 - v))  # the pen's colour throughout, as canvases keep it
    np.testing.assert_allclose(ink_of(b64_file(img)), ink_of(b64_file(drawing())), atol=2 / 255)


def test_a_fully_transparent_image_is_blank() -> None:
    assert not ink_of(b64_file(Image.new("RGBA", (40, 40), (255, 255, 255, 0)))).any()


def test_integer_and_float_pixel_arrays_give_the_same_ink() -> None:
    grey = np.asarray(drawing(28))
    ints = pixel_array(grey.astype(int).tolist())
    floats = pixel_array((grey / 255.0).tolist())
    np.testing.assert_allclose(ink_of(ints), ink_of(floats), atol=1e-6)
    np.testing.assert_allclose(ink_of(ints), ink_of(b64_file(drawing(28))), atol=1e-6)


def test_zero_one_integer_pixels_are_stretched_to_full_ink() -> None:
    ink = ink_of(pixel_array([[0, 0, 0], [0, 1, 0], [0, 0, 0]]))
    assert ink[1, 1] == 1.0 and ink.sum() == 1.0


def test_blank_image_has_no_ink() -> None:
    assert not ink_of(pixel_array([[255] * 4] * 4)).any()


BAD_PIXELS = [[], [[]], [[0, 1], [0]], [[0, 256]], [[0.5, 1.5]], [[True, False]], [["0"]], [0, 1]]


@pytest.mark.parametrize("rows", BAD_PIXELS)
def test_bad_pixel_arrays_are_refused(rows: object) -> None:
    with pytest.raises(InvalidImage):
        pixel_array(rows)


def test_a_bomb_is_refused_from_its_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    big = b64_file(Image.new("1", (3000, 3000), 1))  # 9 megapixels against a limit of 4
    with pytest.raises(ImageTooLarge, match="3000x3000"):
        decode(big, LIMITS)


def test_a_bomb_past_pillows_own_limit_is_refused_too() -> None:
    bomb = b64_file(Image.new("1", (20000, 20000), 1))
    with pytest.raises(ImageTooLarge):
        decode(bomb, ImageLimits(max_bytes=1_000_000, max_pixels=10**12))


def test_encoded_files_over_the_byte_limit_are_refused() -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8))
    with pytest.raises(ImageTooLarge):
        decode(b64_file(noise), ImageLimits(max_bytes=10_000, max_pixels=10**8))


@pytest.mark.parametrize("text", [
    "not base64 at all!",
    b64_file(drawing())[:-3],
    base64.b64encode(b"just some text").decode(),
    "data:image/png,rawbytes",
    "",
])
def test_undecodable_images_are_invalid(text: str) -> None:
    with pytest.raises(InvalidImage):
        decode(text, LIMITS)


@pytest.mark.parametrize(("width", "height"), [(4_000_000, 1), (1, 4_000_000), (100_000, 40)])
def test_a_long_thin_image_is_not_padded_to_its_square(width: int, height: int) -> None:
    # Padded to a square first, a 4,000,000 x 1 image (a few kB as a PNG, within the pixel
    # limit) would take 64 TB; its windows are averaged in place instead.
    buf = io.BytesIO()
    Image.new("L", (width, height), 255).save(buf, "PNG")
    tracemalloc.start()
    try:
        x = model_inputs([base64.b64encode(buf.getvalue()).decode()], LIMITS, 28)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.shape == (1, 28, 28) and not x.any()  # blank paper, no ink
    assert peak < 40 * width * height + 10_000_000  # a few copies of the image, not of its square


@pytest.mark.parametrize(("width", "height"), [(16_000_000, 1), (1, 4_000_000), (300_000, 20)])
def test_a_long_inked_image_is_framed_in_memory_proportional_to_its_pixels(width: int, height: int) -> None:
    # `frame` weighs every pixel of a side for each output pixel: some 700 bytes a pixel of a
    # 16,000,000 pixel side (11 GB) without the bound.
    grey = np.full((height, width), 255, dtype=np.uint8)
    grey[: max(1, height // 2), : max(1, width // 2)] = 0  # ink across half the image
    tracemalloc.start()
    try:
        x = model_inputs([grey], ImageLimits(max_bytes=1, max_pixels=16_000_000), 28)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.shape == (1, 28, 28) and x.max() > 0
    assert peak < 40 * width * height + 10_000_000


def scaled_drawing(width: int, height: int) -> np.ndarray:
    """A circle and a stroke across it, drawn at the canvas's scale (strokes a fifteenth of it)."""
    img = Image.new("L", (width, height), 255)
    side = min(width, height)
    draw, pen, r = ImageDraw.Draw(img), max(1, side // 15), 0.4 * side
    draw.ellipse((width / 2 - r, height / 2 - r, width / 2 + r, height / 2 + r), outline=0, width=pen)
    draw.line((0.1 * width, height / 2, 0.9 * width, height / 2), fill=0, width=pen)
    return np.asarray(img)


# (3000, 80): strokes 5 pixels wide across a glyph 2,400 wide average to a faint line that framing
# brings to full ink; where a line falls between two input pixels moves by the shrink's blocks.
@pytest.mark.parametrize(("width", "height", "tolerance"),
                         [(3000, 80, 0.1), (120, 2500, 0.015), (2400, 1600, 0.015)])
def test_an_image_over_the_longest_side_is_framed_close_to_its_full_size_framing(
    width: int, height: int, tolerance: float, monkeypatch: pytest.MonkeyPatch,
) -> None:
    grey = scaled_drawing(width, height)
    full_size = canonical(grey[None])
    monkeypatch.setattr(images, "LONGEST_SIDE", 1000)  # shrunk by 3 (or cropped only) instead of 8192
    got = model_inputs([grey], LIMITS, 28)
    assert full_size.max() == pytest.approx(1.0)
    np.testing.assert_allclose(got, full_size, rtol=0, atol=tolerance)


def test_an_image_cropped_to_its_ink_frames_exactly_as_the_whole_image() -> None:
    grey = np.full((60, 9000), 255, dtype=np.uint8)
    grey[20:40, 4000:4030] = 0  # a small glyph on a long canvas: cropped, never shrunk
    np.testing.assert_allclose(served(grey), canonical(grey[None]), rtol=0, atol=1e-6)


def png_bytes(img: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **params)
    return buf.getvalue()


def pillow_decode(data: bytes, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """What `decode` gives without libspng (every PNG through Pillow)."""
    with monkeypatch.context() as patch:
        patch.setattr(images, "pyspng", None)
        return decode(data, LIMITS)


GREY_PNGS = {
    "8-bit": lambda noise: png_bytes(Image.fromarray(noise)),
    "8-bit interlaced": lambda noise: png_bytes(Image.fromarray(noise), interlace=1),
    "omniglot drawing": lambda noise: png_bytes(drawing()),
}


@pytest.mark.parametrize("kind", GREY_PNGS)
def test_8_bit_greyscale_pngs_decode_with_libspng_exactly_as_with_pillow(
    kind: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = GREY_PNGS[kind](np.random.default_rng(7).integers(0, 256, (37, 53), dtype=np.uint8))
    expected = pillow_decode(data, monkeypatch)

    def no_pillow(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow opened a greyscale PNG")

    monkeypatch.setattr(Image, "open", no_pillow)
    grey = decode(data, LIMITS)
    assert grey.dtype == np.uint8 and grey.shape == expected.shape
    np.testing.assert_array_equal(grey, expected)


OTHER_PNGS = {
    "1-bit": lambda: png_bytes(drawing().convert("1")),  # Omniglot's own files
    "2-bit": lambda: png_bytes(drawing(), bits=2),
    "RGB": lambda: png_bytes(drawing().convert("RGB")),
    "RGBA canvas": lambda: png_bytes(Image.merge("RGBA", [Image.new("L", (105, 105), 0)] * 3
                                                 + [drawing().point(lambda v: 255 - v)])),
    "grey with alpha": lambda: png_bytes(drawing().convert("LA")),
    "grey with a transparent level": lambda: png_bytes(drawing(), transparency=255),
    "palette": lambda: png_bytes(drawing().convert("P")),
    "16-bit": lambda: png_bytes(Image.fromarray(np.asarray(drawing(), dtype=np.uint16) * 257)),
}


@pytest.mark.parametrize("kind", OTHER_PNGS)
def test_other_pngs_go_to_pillow(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = OTHER_PNGS[kind]()

    def no_spng(*args: object, **kwargs: object) -> None:
        raise AssertionError("libspng decoded a PNG the fast path does not take")

    expected, drawn = pillow_decode(data, monkeypatch), ink_of(b64_file(drawing()))
    monkeypatch.setattr(images.pyspng, "load", no_spng)
    grey = decode(data, LIMITS)
    np.testing.assert_array_equal(grey, expected)
    # the drawing's ink, whatever its encoding
    np.testing.assert_allclose(ink_maps(grey[None])[0], drawn, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "no pixel data", "garbage pixel data", "zero width"])
def test_broken_greyscale_pngs_are_invalid_and_name_the_fault(damage: str) -> None:
    data = png_bytes(drawing())
    broken = {
        "truncated": data[: len(data) // 2],
        "no pixel data": data[:33],
        "garbage pixel data": data[:33] + bytes(range(256)) * 3,
        "zero width": data[:16] + bytes(4) + data[20:],
    }[damage]
    with pytest.raises(InvalidImage, match=r"not a decodable PNG \(.+\)"):
        decode(broken, LIMITS)


def test_image_intake_and_the_canonical_transform_import_without_torch() -> None:
    """Decoding processes import the intake alone: the model's transform must not pull in torch."""
    code = ("import sys, model.transform, service.inference.intake, service.inference.decoding; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m == 'model.metanet'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
