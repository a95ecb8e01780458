"""Image intake: a request's image (base64 file, data URL, pixel array or v2 tensor) -> the model's
input, through the canonical transform that training and evaluation use (`model.transform`).

Size limits are checked before anything is decoded in full; polarity is detected per image, so
dark-on-light (Omniglot's PNGs) and light-on-dark drawings give the same input.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The model's own input transform (numpy only, no torch): the contract between an image and the
# networks, which decoding processes need without the engine.
from model.transform import canonical, frame, ink_maps
from service.errors import ImageTooLarge, InvalidImage

try:  # libspng's decoder (extra "serve"): without it, Pillow decodes every PNG
    import pyspng
except ImportError:  # pragma: no cover - a platform without its wheel
    pyspng = None

# Raster formats only: Pillow's EPS plugin would hand client bytes to Ghostscript.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
_DATA_URL = re.compile(r"data:[^,;]*(;[^,;]*)*?;base64,", re.IGNORECASE)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LONGEST_SIDE = 8192  # framed as it is up to this many pixels a side; longer: see `_bounded`


ImageInput = str | bytes | np.ndarray  # base64 or a data URL; an image file (v2's binary data); pixels


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # encoded file
    max_pixels: int  # width x height, of files and pixel arrays alike


def pixel_array(rows: object) -> np.ndarray:
    """Validate a JSON pixel array: 2-D, rectangular, all integers 0..255 or all numbers in [0, 1].

    Integers 0 and 1 may sit among floats (JavaScript writes 1.0 as 1). Returns float32 grey levels
    on the array's own scale; `model.transform.ink_maps` does not care which scale.
    """
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise InvalidImage("pixels must be a non-empty 2-D array (a list of rows)")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for row in rows for v in row):
        raise InvalidImage("pixels must hold numbers only")
    try:
        arr = np.array(rows, dtype=np.float64)
    except ValueError:
        raise InvalidImage("pixels must be rectangular: every row the same length") from None
    if not np.isfinite(arr).all():
        raise InvalidImage("pixels must be finite numbers")
    all_ints = all(isinstance(v, int) for row in rows for v in row)
    if all_ints and (arr.min() < 0 or arr.max() > 255):
        raise InvalidImage("integer pixels must lie in 0..255")
    if not all_ints and (arr.min() < 0 or arr.max() > 1):
        raise InvalidImage("float pixels must lie in [0, 1]")
    return arr.astype(np.float32)


def decode(image: ImageInput, limits: ImageLimits) -> np.ndarray:
    """A request's image -> grey levels of shape (H, W), uint8 or float32, on the source's own scale.

    bytes are the image file itself (the v2 protocol's binary BYTES elements)."""
    if isinstance(image, np.ndarray):
        _check_pixels(image.shape[1], image.shape[0], limits)
        return image
    if isinstance(image, bytes):
        return _decode_file(_check_file(image, limits), limits)
    return _decode_file(_unbase64(image, limits), limits)


def _shape_stacks(greys: Sequence[np.ndarray]) -> Iterator[tuple[list[int], np.ndarray]]:
    """Images of any shapes -> (indices, the images stacked) for each shape (and dtype) among them."""
    by_shape: dict[tuple[object, ...], list[int]] = {}
    for i, grey in enumerate(greys):
        by_shape.setdefault((grey.shape, grey.dtype), []).append(i)
    for indices in by_shape.values():
        yield indices, np.stack([greys[i] for i in indices])


def model_inputs(images: Sequence[ImageInput], limits: ImageLimits, size: int) -> np.ndarray:
    """A request's images -> the model's inputs (n, size, size) float32: decoded one by one, then
    `model.transform.canonical` (polarity, ink, framing) for all images of a shape at once, as
    training and evaluation frame theirs. A bad image raises InvalidImage or ImageTooLarge with its
    position in `index`. Pure and picklable: it runs in threads or in worker processes alike."""
    greys = []
    for i, image in enumerate(images):
        try:
            greys.append(decode(image, limits))
        except (InvalidImage, ImageTooLarge) as exc:
            exc.index = i
            raise
    out = np.empty((len(images), size, size), dtype=np.float32)
    for indices, stack in _shape_stacks(greys):  # a request's images are mostly of one size
        if max(stack.shape[1:]) <= LONGEST_SIDE:
            out[indices] = canonical(stack, size)
        else:
            out[indices] = [frame(_bounded(ink_maps(grey[None])), size)[0] for grey in stack]
    return out


def _bounded(ink: np.ndarray) -> np.ndarray:
    """An ink map (1, H, W) with a side over LONGEST_SIDE -> one that `frame` takes in bounded memory.

    `frame` weighs every source pixel of a side for each output pixel: (size, H + W) float64
    weights and their temporaries, some 700 bytes per pixel of the sides, so a 16,000,000 x 1 image
    within `max_pixels` would ask for 11 GB. Such an image is first cropped to its ink, which
    changes nothing (`frame` takes what lies beyond an image as background too); if a side is still
    over LONGEST_SIDE, the ink is then shrunk by the smallest whole factor that brings it within,
    the same on both sides (`frame` keeps the aspect), each pixel the mean of a square block. The
    glyph then spans thousands of source pixels, each output pixel averages hundreds of blocks, and
    the framed input is within a few thousandths of the full-size one
    (tests/service/inference/test_intake.py).
    """
    rows, cols = np.flatnonzero(ink[0].any(1)), np.flatnonzero(ink[0].any(0))
    if not len(rows):
        return ink[:, :1, :1]  # blank: framed as background whatever its size
    ink = ink[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    block = -(-max(ink.shape[1:]) // LONGEST_SIDE)  # one factor for both sides: `frame` keeps aspect
    if block > 1:  # sums of block x block squares (a last, partial one holds background too)
        for axis in (1, 2):
            ink = np.add.reduceat(ink, np.arange(0, ink.shape[axis], block), axis=axis, dtype=np.float64)
        ink = (ink / block**2).astype(np.float32)
    return ink


def _unbase64(text: str, limits: ImageLimits) -> bytes:
    prefix = _DATA_URL.match(text)
    if prefix is None and text[:5].lower() == "data:":
        raise InvalidImage("a data URL image must be base64 (data:image/...;base64,...)")
    payload = text[prefix.end():] if prefix else text
    # base64 holds 3 bytes per 4 characters: refuse before decoding what would be too big anyway.
    if len(payload) > 4 * (limits.max_bytes // 3 + 1) + 1024:
        raise ImageTooLarge(f"the encoded image exceeds {limits.max_bytes} bytes")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"not valid base64 ({exc})") from None
    return _check_file(data, limits)


def _check_file(data: bytes, limits: ImageLimits) -> bytes:
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the encoded image is {len(data)} bytes, more than {limits.max_bytes}")
    if not data:
        raise InvalidImage("the image is empty")
    return data


def _decode_file(data: bytes, limits: ImageLimits) -> np.ndarray:
    grey = _grey_png(data, limits)
    if grey is not None:
        return grey
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            # Image.open reads only the header: refuse a bomb before its pixels are inflated.
            _check_pixels(img.width, img.height, limits)
            img.load()
            return _grey(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires in Image.open for sizes far past its default limit.
        raise ImageTooLarge(f"the image has too many pixels ({exc})") from None
    except (ImageTooLarge, InvalidImage):
        raise
    except Image.UnidentifiedImageError:
        raise InvalidImage(f"not an image file Pillow reads as any of {', '.join(FORMATS)}") from None
    except Exception as exc:  # Pillow's decoders raise a zoo of types on corrupt input
        raise InvalidImage(f"not a decodable image ({type(exc).__name__}: {exc})") from None


def _grey_png(data: bytes, limits: ImageLimits) -> np.ndarray | None:
    """An 8-bit greyscale PNG without transparency (drawings, scans) decoded by libspng: the
    same uint8 grey levels as Pillow's, in less than half the time (docs/performance.md,
    "Decoding PNGs with libspng").
    None for any other file, which Pillow decodes: colour, alpha, 16 bits, a `tRNS` chunk
    anywhere (perhaps only in compressed bytes: Pillow then decodes it all the same), no pyspng,
    and 1, 2 or 4 bits a pixel, whose expansion to 8 bits libspng does no faster than Pillow."""
    if pyspng is None or len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    bit_depth, colour_type = data[24], data[25]
    if colour_type != 0 or bit_depth != 8 or b"tRNS" in data:
        return None
    # IHDR's width and height: refuse a bomb before libspng inflates its pixels; one past
    # Pillow's own bomb guard goes to Pillow, whose error says so.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    _check_pixels(width, height, limits)
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        return None
    try:
        return pyspng.load(data, "L")
    except Exception as exc:  # libspng names the fault: "end of stream", "invalid IHDR", ...
        message = str(exc).removeprefix("pyspng: could not decode image: ")
        raise InvalidImage(f"not a decodable PNG ({message})") from None


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, more than {limits.max_pixels}"
        )


def _grey(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img, dtype=np.float32)  # high bit depth: keep it, ink_maps rescales
    if "A" in img.getbands() or "transparency" in img.info:
        # Strokes drawn on a transparent canvas: put them on white paper, or on black paper where
        # white would hide them (a white pen, as apps with a dark theme export their drawings).
        rgba = img.convert("RGBA")
        on_white = _on_paper(rgba, 255)
        lo, hi = on_white.getextrema()
        return np.asarray(on_white if lo < hi else _on_paper(rgba, 0))
    return np.asarray(img.convert("L"))  # uint8: ink_maps reads the levels as they are


def _on_paper(rgba: Image.Image, shade: int) -> Image.Image:
    paper = Image.new("RGBA", rgba.size, (shade, shade, shade, 255))
    return Image.alpha_composite(paper, rgba).convert("L")
