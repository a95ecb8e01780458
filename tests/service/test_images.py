"""Image intake: encodings, polarity, pixel arrays, and refusing bombs before they are decoded."""

from __future__ import annotations

import base64
import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from model.data import to_model_input
from service import images
from service.errors import ImageTooLarge, InvalidImage
from service.images import ImageLimits, decode, ink_map, model_inputs, pixel_array, resize

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
    return ink_map(decode(image, limits))


def test_black_on_white_png_gives_exactly_one_minus_grey() -> None:
    img = drawing()
    expected = 1.0 - np.asarray(img, dtype=np.float32) / 255.0  # model.data's PNG preprocessing
    np.testing.assert_array_equal(ink_of(b64_file(img)), expected)


def test_white_on_black_gives_the_same_ink_as_black_on_white() -> None:
    img = drawing()
    inverted = Image.eval(img, lambda v: 255 - v)
    np.testing.assert_array_equal(ink_of(b64_file(inverted)), ink_of(b64_file(img)))


def test_omniglot_drawing_matches_the_training_preprocessing_exactly() -> None:
    rng = np.random.default_rng(0)
    ink = np.zeros((105, 105), dtype=np.uint8)
    ink[30:70, 50:56] = 1
    ink[rng.integers(0, 105, 40), rng.integers(0, 105, 40)] = 1
    png = b64_file(Image.fromarray((255 * (1 - ink)).astype(np.uint8), mode="L").convert("1"))
    served = to_model_input(ink_of(png)).numpy()
    trained = to_model_input(ink.astype(np.float32)).numpy()
    np.testing.assert_array_equal(served, trained)


def test_data_url_prefix_is_accepted() -> None:
    plain = b64_file(drawing())
    np.testing.assert_array_equal(ink_of("data:image/png;base64," + plain), ink_of(plain))


def test_strokes_on_a_transparent_canvas_are_put_on_white_paper() -> None:
    img = drawing().convert("RGBA")
    img.putalpha(Image.eval(drawing(), lambda v: 255 - v))
    np.testing.assert_array_equal(ink_of(b64_file(img)), ink_of(b64_file(drawing())))


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


@pytest.mark.parametrize("shape", [(2, 40, 105), (1, 105, 37), (3, 3, 200), (2, 200, 3), (1, 28, 20),
                                   (1, 1, 5), (1, 29, 28), (2, 105, 105), (1, 4, 4)])
def test_resizing_matches_the_training_preprocessing(shape: tuple[int, int, int]) -> None:
    ink = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    np.testing.assert_allclose(resize(ink, 28), to_model_input(ink).numpy(), rtol=0, atol=1e-6)


def test_a_square_image_resizes_the_same_alone_or_in_a_stack() -> None:
    stack = np.random.default_rng(1).random((5, 105, 105)).astype(np.float32)
    np.testing.assert_array_equal(resize(stack[2:3], 28)[0], resize(stack, 28)[2])


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
    np.testing.assert_allclose(ink_map(grey), drawn, atol=1e-6)  # the drawing's ink, whatever its encoding


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


def long_way(greys: np.ndarray) -> np.ndarray:
    return resize(images.ink_maps(greys), 28)


def test_drawings_take_the_shortcut_to_the_same_model_inputs_as_the_long_way() -> None:
    """Ink of a drawing whose paper is its lightest (or darkest) level is an affine map of its grey
    levels inside [0, 1]: resizing the greys first gives the ink's area means, within rounding."""
    dark_on_light = np.asarray(drawing(), dtype=np.uint8)
    faint = (160 + dark_on_light // 3).astype(np.uint8)  # a grey stroke on light grey paper
    stack = np.stack([dark_on_light, 255 - dark_on_light, faint, 255 - faint])
    got = images._inputs_of_stack(stack, 28)
    np.testing.assert_allclose(got, long_way(stack), rtol=0, atol=1e-6)
    assert got.min() == 0.0 and got.max() > 0.9  # ink stretched to its full scale
    # Omniglot's own preprocessing, through the service's decoding and the shortcut
    rng = np.random.default_rng(3)
    ink = (rng.random((4, 105, 105)) < 0.1).astype(np.uint8)
    files = [b64_file(Image.fromarray((255 * (1 - i)).astype(np.uint8), mode="L")) for i in ink]
    trained = to_model_input(ink.astype(np.float32)).numpy()
    np.testing.assert_allclose(model_inputs(files, LIMITS, 28), trained, rtol=0, atol=1e-6)


def test_images_the_shortcut_does_not_fit_go_the_long_way_each_the_same_alone_or_in_a_stack() -> None:
    rng = np.random.default_rng(5)
    marks = rng.integers(0, 256, (105, 105)).astype(np.uint8)
    marks[0], marks[-1], marks[:, 0], marks[:, -1] = 128, 128, 128, 128  # mid-grey paper: ink both ways
    blank = np.full((105, 105), 200, dtype=np.uint8)
    drawn = np.asarray(drawing(), dtype=np.uint8)
    stack = np.stack([marks, blank, drawn, 255 - drawn])
    got = images._inputs_of_stack(stack, 28)
    np.testing.assert_array_equal(got[0], long_way(marks[None])[0])  # clipped ink: the long way
    assert not got[1].any()  # blank paper: no ink
    for i, image in enumerate(stack):
        np.testing.assert_array_equal(images._inputs_of_stack(image[None], 28)[0], got[i])
    # Not 8-bit (a pixel array, a 16-bit file), not square, or already the model's size: the long way.
    for other in (drawn.astype(np.float32)[None] / 255, drawn[None, :, :90], drawn[None, :28, :28]):
        np.testing.assert_array_equal(images._inputs_of_stack(other, 28), long_way(other))
