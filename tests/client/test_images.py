"""Image encoding: every kind of input becomes the contract's image value, or an ImageError saying
which image and why."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from metanet_client import EncodedImage, Example, ImageError, encode_image
from metanet_client._images import as_image_list, encode_examples, encode_images


def drawing(mode: str = "L", size: int = 32) -> Image.Image:
    img = Image.new("L", (size, size), 255)
    ImageDraw.Draw(img).ellipse((6, 6, size - 6, size - 6), outline=0, width=3)
    return img.convert(mode)


def decoded(value: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
    img.load()
    return img


def test_a_png_file_is_sent_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    drawing().save(path)
    assert base64.b64decode(encode_image(path).value) == path.read_bytes()
    assert encode_image(str(path)) == encode_image(path)


def test_a_jpeg_file_is_sent_as_is_not_reencoded(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    drawing("RGB").save(path, "JPEG")
    assert base64.b64decode(encode_image(path).value) == path.read_bytes()


def test_a_format_outside_the_contract_is_reencoded_as_png(tmp_path: Path) -> None:
    path = tmp_path / "a.tiff"
    drawing().save(path, "TIFF")
    img = decoded(encode_image(path).value)
    assert img.format == "PNG"
    assert np.array_equal(np.asarray(img), np.asarray(drawing()))


def test_a_pil_image_becomes_a_lossless_png() -> None:
    img = decoded(encode_image(drawing()).value)
    assert img.format == "PNG" and np.array_equal(np.asarray(img), np.asarray(drawing()))


@pytest.mark.parametrize("mode", ["CMYK", "F", "LA", "RGBA", "1", "P"])
def test_pil_images_of_any_mode_encode_to_png(mode: str) -> None:
    img = decoded(encode_image(drawing(mode)).value)
    assert img.format == "PNG" and img.size == (32, 32)


def test_file_bytes_are_base64_encoded_unchecked() -> None:
    assert encode_image(b"\x89PNG...").value == base64.b64encode(b"\x89PNG...").decode()


def test_uint8_and_float_arrays_become_pixels_of_plain_numbers() -> None:
    ints = encode_image(np.array([[0, 255], [128, 7]], dtype=np.uint8)).value
    assert ints == {"pixels": [[0, 255], [128, 7]]}
    assert all(type(v) is int for row in ints["pixels"] for v in row)
    floats = encode_image(np.array([[0.0, 0.5]], dtype=np.float32)).value
    assert floats == {"pixels": [[0.0, 0.5]]}
    assert all(type(v) is float for row in floats["pixels"] for v in row)


def test_boolean_arrays_become_0_and_255() -> None:
    assert encode_image(np.array([[True, False]])).value == {"pixels": [[255, 0]]}


def test_nested_lists_and_tuples_are_pixels() -> None:
    assert encode_image(((1, 2), [3, 4])).value == {"pixels": [[1, 2], [3, 4]]}


@pytest.mark.parametrize(("value", "reason"), [
    (np.zeros((2, 2, 3)), "3-D"),
    ([1, 2, 3], "2-D"),
    ([], "unsupported image type"),
    ([["a"]], "got str"),
    (object(), "unsupported image type object"),
])
def test_what_is_not_an_image_raises_image_error_with_the_reason(value: object, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        encode_image(value)


def test_a_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nope.png: no such file"):
        encode_image(tmp_path / "nope.png")


def test_a_file_that_is_not_an_image_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ImageError, match="notes.txt: not an image file"):
        encode_image(path)


def test_an_image_error_is_also_a_value_error() -> None:
    assert issubclass(ImageError, ValueError)


def test_encoded_images_pass_through_untouched() -> None:
    already = EncodedImage("data:image/png;base64,AAAA")
    assert encode_image(already) is already
    assert encode_images([already]) == ["data:image/png;base64,AAAA"]


def test_a_lone_image_is_a_batch_of_one_and_a_3d_array_a_batch_of_2d_images(tmp_path: Path) -> None:
    assert as_image_list("a.png") == ["a.png"]
    assert len(as_image_list(drawing())) == 1
    batch = encode_images(np.zeros((3, 2, 2), dtype=np.uint8))
    assert batch == [{"pixels": [[0, 0], [0, 0]]}] * 3


def test_a_lone_2d_array_is_refused_rather_than_read_as_rows() -> None:
    with pytest.raises(ImageError, match="single 2-D array"):
        encode_images(np.zeros((2, 2)))


def test_batch_errors_name_the_position() -> None:
    with pytest.raises(ImageError, match=r"^image 1: "):
        encode_images([[[0]], object()])


def test_examples_from_a_mapping_keep_its_order_and_accept_lone_images() -> None:
    pixels = [[0, 255]]
    out = encode_examples({"b": [pixels, pixels], "a": EncodedImage("x")})
    assert [e["label"] for e in out] == ["b", "b", "a"]
    assert out[0]["image"] == {"pixels": pixels} and out[2]["image"] == "x"


def test_examples_from_pairs_and_example_tuples() -> None:
    out = encode_examples([("a", EncodedImage("x")), Example("b", EncodedImage("y"))])
    assert out == [{"label": "a", "image": "x"}, {"label": "b", "image": "y"}]


def test_example_errors_name_the_index_and_label() -> None:
    with pytest.raises(ImageError, match=r"^example 1 \('b'\): "):
        encode_examples([("a", EncodedImage("x")), ("b", 42)])
    with pytest.raises(ImageError, match="pair"):
        encode_examples(["just-a-path.png"])
