"""Turn what a caller has (a path, file bytes, a PIL image, a 2-D array) into the contract's image
value: base64 of an image file, or `{"pixels": rows}`. Only Pillow is needed; numpy is duck-typed.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

from PIL import Image, UnidentifiedImageError

from metanet_client._errors import ImageError

# The formats docs/api.md promises the service decodes; a file in any other format Pillow reads
# (TIFF, ICO, ...) is re-encoded as PNG on this side.
WIRE_FORMATS = frozenset({"PNG", "JPEG", "BMP", "GIF", "WEBP"})
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """An image already in the contract's form: a base64 string (or data URL) or {"pixels": rows}.
    Passed through untouched, so callers can encode once (e.g. with a progress bar) and send later."""

    value: str | dict[str, list[list[float]]]


# A path (str or os.PathLike), encoded file bytes, a PIL image, a 2-D array (numpy, torch or nested
# lists of grey levels: ints 0..255 or floats 0..1), or an EncodedImage.
ImageInput: TypeAlias = Any


class Example(NamedTuple):
    """One support example; any (label, image) pair works where an Example is expected."""

    label: str
    image: ImageInput


def encode_image(image: ImageInput) -> EncodedImage:
    """`image` as the contract's image value. Raises ImageError naming what could not be read."""
    if isinstance(image, EncodedImage):
        return image
    if isinstance(image, str | os.PathLike):
        return EncodedImage(_b64(_file_bytes(Path(image))))
    if isinstance(image, bytes | bytearray | memoryview):
        return EncodedImage(_b64(bytes(image)))
    if isinstance(image, Image.Image):
        return EncodedImage(_b64(_png(image)))
    return EncodedImage({"pixels": _pixels(image)})


def encode_images(images: ImageInput | Iterable[ImageInput]) -> list[str | dict[str, Any]]:
    """A batch of images as wire values; errors say which position failed."""
    values = []
    for i, image in enumerate(as_image_list(images)):
        try:
            values.append(encode_image(image).value)
        except ImageError as exc:
            raise ImageError(f"image {i}: {exc}") from exc.__cause__
    return values


def encode_examples(
    examples: Mapping[str, ImageInput | Iterable[ImageInput]] | Iterable[tuple[str, ImageInput]],
) -> list[dict[str, Any]]:
    """Support examples as the contract's `[{"label", "image"}, ...]`, from either a mapping
    label -> images (keeping the mapping's order) or an iterable of (label, image) pairs."""
    if isinstance(examples, Mapping):
        pairs = [(label, image) for label, images in examples.items() for image in as_image_list(images)]
    else:
        pairs = [_as_pair(example) for example in examples]
    out = []
    for i, (label, image) in enumerate(pairs):
        try:
            out.append({"label": label, "image": encode_image(image).value})
        except ImageError as exc:
            raise ImageError(f"example {i} ({label!r}): {exc}") from exc.__cause__
    return out


def as_image_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """A lone path, bytes, PIL image or EncodedImage is a batch of one; a 3-D array is a batch of
    2-D images. A lone 2-D array or list of rows is refused: it would read as a batch of rows."""
    if isinstance(images, str | os.PathLike | bytes | bytearray | memoryview | Image.Image | EncodedImage):
        return [images]
    if getattr(images, "ndim", None) == 2:
        raise ImageError("a single 2-D array is one image: pass a list of images ([array]) "
                         "or a 3-D array (n_images, height, width)")
    try:
        return list(images)
    except TypeError:
        raise ImageError(f"expected an image or an iterable of images, got {type(images).__name__}") from None


def _as_pair(example: Any) -> tuple[str, ImageInput]:
    try:
        if isinstance(example, str | bytes):  # "ab" would unpack into a label and an image
            raise TypeError
        label, image = example
    except (TypeError, ValueError):
        raise ImageError(f"an example is a (label, image) pair, got {type(example).__name__}") from None
    return label, image


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _file_bytes(path: Path) -> bytes:
    """A file's bytes as they are when the service reads its format, else re-encoded as PNG.
    Only the header is parsed here, so a large JPEG is not decoded just to be sent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format in WIRE_FORMATS:
                return data
            img.load()
            return _png(img)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file") from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for corrupt files
        raise ImageError(f"{path}: not a readable image ({exc})") from exc


def _png(img: Image.Image) -> bytes:
    if img.mode not in _PNG_MODES:  # CMYK, YCbCr, F, ...: convert to the nearest mode PNG holds
        bands = img.getbands()
        img = img.convert("RGBA" if "A" in bands else "L" if len(bands) == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _pixels(array: Any) -> list[list[float]]:
    """A 2-D array-like as a list of rows of plain numbers; booleans become 0 / 255."""
    rows = array.tolist() if hasattr(array, "tolist") else array
    if not isinstance(rows, list | tuple) or not rows:
        raise ImageError(f"unsupported image type {type(array).__name__}: pass a path, file bytes, "
                         "a PIL image or a 2-D array of grey levels")
    out = []
    for row in rows:
        if not isinstance(row, list | tuple) or not row:
            raise ImageError("a pixel array must be 2-D: a non-empty list of non-empty rows")
        values = []
        for v in row:
            if isinstance(v, bool):
                v = 255 if v else 0
            elif not isinstance(v, int | float):
                depth = "3-D (colour?) arrays are not accepted; convert to grey levels first" \
                    if isinstance(v, list | tuple) else f"got {type(v).__name__}"
                raise ImageError(f"a pixel array must be 2-D grey levels: {depth}")
            values.append(v)
        out.append(values)
    return out
