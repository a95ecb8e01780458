"""The canonical input transform: any image of a glyph -> the model's input, framed one way.

Training, evaluation and the service all pass images through `canonical` (or `frame`, for ink maps
that are already ink = 1 on 0), so the networks see a glyph the same way whatever the size of the
image, where the glyph sits in it, how large it is drawn and which polarity it has:

1. `ink_maps`: grey levels of either polarity -> ink = 1 on background 0 (the paper is the median
   of the image's border; the ink is stretched to the darkest, or brightest, stroke).
2. `frame`: the glyph's bounding box (pixels of at least `INK_THRESHOLD` of the image's strongest
   ink) is scaled, aspect ratio kept, so its longer side spans `BOX` of the `size` pixels of the
   output, and the glyph is centred in it by its ink's centre of mass; each output pixel is the
   area mean of the source pixels it covers (exact box filtering, so thin strokes survive a large
   reduction and a small glyph is enlarged without holes), and the result is scaled so its
   strongest pixel is full ink. Nothing of the source is cropped but what falls beyond the
   output's edge.

Why these choices (docs/model.md, "Input framing", has the figures and the commands):
- `BOX = 20` of 28: Omniglot's glyphs span a median 72 of their 105 pixels, which weights trained
  without this framing saw as about 19 pixels; a box of 20 served those weights best (16 and 24
  did worse) and leaves a margin that keeps strokes off the edge, where the convolutions see
  padding.
- Centred by the ink's mass rather than the box's middle: a little better in the same
  comparison, as for MNIST's framing.
- The strongest output pixel made full ink: a pen fine for the glyph's size (a 1-pixel stroke
  on a large canvas) averages to a faint trace, 0.1 of ink or less, which the model read as a blank
  page (chance accuracy); 98% of Omniglot's drawings already reach full ink and are unchanged.
- No stroke-width normalisation: the pen is left as drawn and training varies it (model.augment).
  Eroding wide strokes to Omniglot's width before framing gained 1.6 points on thick pens and
  lost 13 on coarsely drawn digits (`bench/robustness.py --stroke normalised`).

Works on numpy arrays (the service, which keeps torch off its request threads) and on torch
tensors on any device (training), with the same arithmetic.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Model input side, the glyph box within it, and the ink level that counts as the glyph.
SIZE = 28
BOX = 20
INK_THRESHOLD = 0.5


def canonical(greys: np.ndarray, size: int = SIZE, box: int = BOX, centre: str = "mass") -> np.ndarray:
    """Grey levels (n, H, W) of either polarity -> model inputs (n, size, size) float32."""
    return frame(ink_maps(greys), size, box, centre)


def frame(ink: Any, size: int = SIZE, box: int = BOX, centre: str = "mass") -> Any:
    """Ink maps (n, H, W) in [0, 1], numpy or torch -> (n, size, size) of the same kind.

    Blank images (no ink at the threshold) come back all background. `centre` "box" centres the
    glyph by its bounding box instead of its ink's centre of mass (the alternative the robustness
    benchmark compares, `--centre box`).
    """
    if centre not in ("box", "mass"):
        raise ValueError(f"centre must be 'box' or 'mass', got {centre!r}")
    xp = _namespace(ink)
    if xp is np:
        ink = ink.astype(np.float32, copy=False)
    n, height, width = ink.shape
    # The glyph: ink at INK_THRESHOLD of the image's strongest or more (a thin stroke shrunk to a
    # few pixels never reaches full ink).
    strongest = ink.reshape(n, -1).max(1)
    strongest = strongest if xp is np else strongest.values
    mask = (ink >= INK_THRESHOLD * strongest[:, None, None]) & (ink > 0)
    rows, cols = mask.any(2), mask.any(1)
    present = rows.any(1)
    top, bottom = _first(rows, xp), height - _first(xp.flip(rows, (1,)), xp)
    left, right = _first(cols, xp), width - _first(xp.flip(cols, (1,)), xp)
    extent = xp.maximum(bottom - top, right - left)
    extent = xp.where(present, extent, 1)  # a blank image: any frame, it holds no ink
    side = extent * (size / box)  # source pixels the output spans, on each axis
    if centre == "mass":
        total = xp.where(present, ink.sum((1, 2)), 1)
        middle_row = (ink.sum(2) * _positions(height, xp, ink)).sum(1) / total + 0.5
        middle_col = (ink.sum(1) * _positions(width, xp, ink)).sum(1) / total + 0.5
    else:
        middle_row, middle_col = (top + bottom) / 2, (left + right) / 2
    along_rows = _area_weights(middle_row, side, height, size, xp, ink)
    along_cols = _area_weights(middle_col, side, width, size, xp, ink)
    out = xp.clip(along_rows @ ink @ xp.swapaxes(along_cols, 1, 2), 0.0, 1.0)
    peak = out.reshape(n, -1).max(1)
    peak = peak if xp is np else peak.values
    return out / xp.where(peak > 0, peak, 1)[:, None, None]  # the strongest pixel full ink


def _positions(length: int, xp: Any, like: Any) -> Any:
    if xp is np:
        return np.arange(length, dtype=like.dtype)
    return xp.arange(length, dtype=like.dtype, device=like.device)


def _first(flags: Any, xp: Any) -> Any:
    """Index of the first True of each row of (n, L) booleans (0 where none), as float64/32."""
    if xp is np:
        return flags.argmax(1).astype(np.float64)
    return flags.to(xp.uint8).argmax(1).to(xp.float32)


def _area_weights(centre: Any, side: Any, length: int, size: int, xp: Any, like: Any) -> Any:
    """(n, size, length): row i averages the source pixels [k, k + 1) under output pixel i, which
    covers [centre - side / 2 + i * side / size, ... + side / size); pixels outside the source
    count as background."""
    step = side / size
    if xp is np:
        i = np.arange(size, dtype=np.float64)
        k = np.arange(length, dtype=np.float64)
    else:
        i = xp.arange(size, dtype=xp.float32, device=like.device)
        k = xp.arange(length, dtype=xp.float32, device=like.device)
    start = (centre - side / 2)[:, None] + i[None] * step[:, None]  # (n, size)
    end = start + step[:, None]
    overlap = xp.minimum(end[:, :, None], k[None, None] + 1) - xp.maximum(start[:, :, None], k[None, None])
    weights = xp.clip(overlap, 0.0, None) / step[:, None, None]
    return weights.astype(np.float32) if xp is np else weights.to(like.dtype)


def _namespace(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return np
    import torch

    if isinstance(x, torch.Tensor):
        return torch
    raise TypeError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")


def ink_maps(greys: np.ndarray) -> np.ndarray:
    """Grey levels (n, H, W) on any scale -> ink = 1, background = 0, float32, each image alone.

    The background is the median of an image's border (drawings rarely touch the frame); whichever
    extreme it is nearer to is the paper. Ink is then scaled from the paper's level to the darkest
    (or brightest) stroke, so a binary Omniglot PNG maps to exactly 1 - grey / 255 and faint scans
    or 0/1-valued pixel arrays are stretched to full ink.
    """
    x = np.asarray(greys)
    levels = x if x.dtype == np.uint8 else x.astype(np.float32)
    flat = levels.reshape(len(levels), -1)
    lo, hi = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
    border = np.concatenate([levels[:, 0], levels[:, -1], levels[:, :, 0], levels[:, :, -1]], axis=1)
    paper = np.median(border.astype(np.float32), axis=1).astype(np.float64)
    dark = paper - lo >= hi - paper  # light paper, dark ink
    blank = hi == lo
    scale = np.where(blank, 1.0, np.where(dark, paper - lo, hi - paper)).astype(np.float32)
    ink = levels.astype(np.float32) - paper.astype(np.float32)[:, None, None]
    np.negative(ink, out=ink, where=dark[:, None, None])  # paper - grey, exactly
    ink /= scale[:, None, None]
    ink[blank] = 0.0
    return np.clip(ink, 0.0, 1.0, out=ink)
