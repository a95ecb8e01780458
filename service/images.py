"""Image intake: a request's image (base64 file, data URL or pixel array) -> an ink map in [0, 1].

Size limits are checked before anything is decoded in full; polarity is detected per image, so
dark-on-light (Omniglot's PNGs) and light-on-dark drawings give the same ink map.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage

try:  # libspng's decoder (extra "serve"): without it, Pillow decodes every PNG
    import pyspng
except ImportError:  # pragma: no cover - a platform without its wheel
    pyspng = None

# Raster formats only: Pillow's EPS plugin would hand client bytes to Ghostscript.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
_DATA_URL = re.compile(r"data:[^,;]*(;[^,;]*)*?;base64,", re.IGNORECASE)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # encoded file
    max_pixels: int  # width x height, of files and pixel arrays alike


def pixel_array(rows: object) -> np.ndarray:
    """Validate a JSON pixel array: 2-D, rectangular, all integers 0..255 or all numbers in [0, 1].

    Integers 0 and 1 may sit among floats (JavaScript writes 1.0 as 1). Returns float32 grey levels
    on the array's own scale; `ink_map` does not care which scale.
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


def decode(image: str | bytes | np.ndarray, limits: ImageLimits) -> np.ndarray:
    """A request's image -> grey levels of shape (H, W), uint8 or float32, on the source's own scale.

    bytes are the image file itself (the v2 protocol's binary BYTES elements)."""
    if isinstance(image, np.ndarray):
        _check_pixels(image.shape[1], image.shape[0], limits)
        return image
    if isinstance(image, bytes):
        return _decode_file(_check_file(image, limits), limits)
    return _decode_file(_unbase64(image, limits), limits)


def ink_map(grey: np.ndarray) -> np.ndarray:
    """Grey levels (H, W) on any scale -> ink = 1, background = 0, float32.

    The background is the median of the image's border (drawings rarely touch the frame); whichever
    extreme it is nearer to is the paper. Ink is then scaled from the background level to the
    darkest (or brightest) stroke, so a binary Omniglot PNG maps to exactly 1 - grey / 255, the
    training preprocessing, and faint scans or 0/1-valued pixel arrays are stretched to full ink.
    """
    return ink_maps(np.asarray(grey)[None])[0]


def ink_maps(greys: np.ndarray) -> np.ndarray:
    """`ink_map` of each image of a stack (n, H, W), in a few numpy calls for the whole stack (a
    request's images cost far less than one by one); each image's ink is the same, bit for bit."""
    x = np.asarray(greys, dtype=np.float32)
    _, _, paper, dark, blank, scale = _levels(np.asarray(greys))
    ink = x - paper.astype(np.float32)[:, None, None]
    np.negative(ink, out=ink, where=dark[:, None, None])  # paper - grey, exactly
    ink /= scale[:, None, None]
    ink[blank] = 0.0
    return np.clip(ink, 0.0, 1.0, out=ink)


def _levels(greys: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per image of a stack (n, H, W): its lowest and highest level, the paper's level, whether
    the ink is darker than the paper, whether the image is blank, and the ink's full scale
    (float32). The paper is the median of the border; the levels are in float64, as Python floats
    would be: the polarity test is exact. uint8 greys (decoded files) are read as they are, the
    rest as float32: the same levels either way."""
    x = greys if greys.dtype == np.uint8 else np.asarray(greys, dtype=np.float32)
    flat = x.reshape(len(x), -1)
    lo, hi = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1).astype(np.float32)
    paper = np.median(border, axis=1).astype(np.float64)
    dark = paper - lo >= hi - paper  # light paper, dark ink
    blank = hi == lo  # no ink anywhere
    scale = np.where(blank, 1.0, np.where(dark, paper - lo, hi - paper)).astype(np.float32)
    return lo, hi, paper, dark, blank, scale


def _shape_stacks(greys: Sequence[np.ndarray]) -> Iterator[tuple[list[int], np.ndarray]]:
    """Images of any shapes -> (indices, the images stacked) for each shape (and dtype) among them."""
    by_shape: dict[tuple[object, ...], list[int]] = {}
    for i, grey in enumerate(greys):
        by_shape.setdefault((grey.shape, grey.dtype), []).append(i)
    for indices in by_shape.values():
        yield indices, np.stack([greys[i] for i in indices])


def model_inputs(images: Sequence[str | bytes | np.ndarray], limits: ImageLimits, size: int) -> np.ndarray:
    """A request's images -> the model's inputs (n, size, size) float32: decoded one by one, then
    ink and resizing for all images of a shape at once. A bad image raises InvalidImage or
    ImageTooLarge with its position in `index`. Pure and picklable: it runs in threads or in
    worker processes alike."""
    greys = []
    for i, image in enumerate(images):
        try:
            greys.append(decode(image, limits))
        except (InvalidImage, ImageTooLarge) as exc:
            exc.index = i
            raise
    out = np.empty((len(images), size, size), dtype=np.float32)
    for indices, stack in _shape_stacks(greys):  # a request's images are mostly of one size
        out[indices] = _inputs_of_stack(stack, size)
    return out


def _inputs_of_stack(greys: np.ndarray, size: int) -> np.ndarray:
    """Model inputs of a stack of greys of one shape: `resize(ink_maps(greys))`, with a shortcut
    for square 8-bit images whose paper is their lightest (or darkest) level, as drawings'
    is: their ink is then an affine map of the grey levels that never leaves [0, 1], so it
    commutes with the (linear, weights summing to 1) area averaging, and each such image is
    resized from its grey levels and only its size x size result mapped to ink. Rounding aside,
    the same values (within 1e-6 of the long way); and each image's the same, bit for bit, alone
    or in a stack (which way an image goes depends on it alone). The long way made a 105x105
    drawing's whole query path, its decoding included, take 1.23 times as long
    (`python bench/decode.py`: 53.8 against 43.6 µs an image on this CPU)."""
    n, height, width = greys.shape
    if greys.dtype != np.uint8 or height != width or width == size:
        return resize(ink_maps(greys), size)
    lo, hi, paper, dark, blank, scale = _levels(greys)
    short = ~blank & (paper == np.where(dark, hi, lo))
    out = np.empty((n, size, size), dtype=np.float32)
    out[blank] = 0.0
    long_way = ~blank & ~short
    if long_way.any():
        out[long_way] = resize(ink_maps(greys[long_way]), size)
    if short.any():
        rows = _area_weights(width, size)
        means = rows @ greys[short].astype(np.float32) @ rows.T  # the grey levels' area means
        ink = means - paper[short].astype(np.float32)[:, None, None]
        np.negative(ink, out=ink, where=dark[short][:, None, None])
        ink /= scale[short][:, None, None]
        out[short] = np.clip(ink, 0.0, 1.0, out=ink)
    return out


def resize(ink: np.ndarray, size: int) -> np.ndarray:
    """Ink maps (n, H, W) -> (n, size, size) float32, as `model.data.to_model_input` does in
    training: non-square images padded to a centred square, then area averaging.

    Area averaging is separable (each output pixel averages a rectangle of rows x columns, the
    windows of torch's adaptive_avg_pool2d). A square image takes two small matrix products, which
    numpy runs for the whole stack in one call; each image's result is the same, bit for bit, alone
    or in a stack. A non-square one is averaged over the windows of its padded square without
    building that square: a 100000 x 1 image within the pixel limit would otherwise pad to 37 GB.
    No torch op runs, which keeps request threads off torch's CPU thread team.
    """
    x = np.asarray(ink, dtype=np.float32)
    h, w = x.shape[-2:]
    if h != w:
        side = max(h, w)
        axes = [(-2, (side - h) // 2), (-1, (side - w) // 2)]  # the long axis first: it shrinks most
        (axis, offset), (axis2, offset2) = axes if h > w else axes[::-1]
        lead = x.shape[:-2]
        # One image at a time: the prefix sums of the long axis are 8 bytes a pixel.
        x = np.stack([_window_means(image, axis, side, offset, size) for image in x.reshape(-1, h, w)])
        x = _window_means(x, axis2, side, offset2, size).reshape(*lead, size, size)
    elif w != size:
        rows = _area_weights(w, size)
        x = rows @ x @ rows.T
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


def _window_means(x: np.ndarray, axis: int, side: int, offset: int, size: int) -> np.ndarray:
    """Means along `axis` over the `size` area windows of a length-`side` axis in which x's
    values start at `offset` and the rest is background (0): prefix sums, no padding."""
    axis %= x.ndim
    shape = list(x.shape)
    length, shape[axis] = shape[axis], shape[axis] + 1
    sums = np.zeros(shape, dtype=np.float64)  # sums[k]: the sum of the first k values
    np.cumsum(x, axis=axis, dtype=np.float64, out=sums[(slice(None),) * axis + (slice(1, None),)])
    i = np.arange(size)
    start, end = (i * side) // size, -((-(i + 1) * side) // size)
    inside = [np.clip(bound - offset, 0, length) for bound in (start, end)]
    shape = [1] * x.ndim
    shape[axis] = size
    totals = np.take(sums, inside[1], axis=axis) - np.take(sums, inside[0], axis=axis)
    return (totals / (end - start).reshape(shape)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _area_weights(n: int, size: int) -> np.ndarray:
    """(size, n): row i averages source pixels [floor(i n / size), ceil((i + 1) n / size))."""
    weights = np.zeros((size, n), dtype=np.float32)
    for i in range(size):
        start, end = (i * n) // size, -((-(i + 1) * n) // size)
        weights[i, start:end] = 1.0 / (end - start)
    weights.flags.writeable = False
    return weights


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
    same uint8 grey levels as Pillow's, and a query image's whole path (ink and resizing too) in
    0.43 of the time it takes with Pillow (`python bench/decode.py`).
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
        return np.asarray(img, dtype=np.float32)  # high bit depth: keep it, ink_map rescales
    if "A" in img.getbands() or "transparency" in img.info:
        # Strokes drawn on a transparent canvas: put them on white paper.
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    return np.asarray(img.convert("L"))  # uint8: ink_maps converts the whole stack at once
