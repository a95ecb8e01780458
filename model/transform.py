"""The canonical input transform: any image of a glyph -> the model's input, framed one way.

Training, evaluation and the service all pass images through `canonical` (or `frame`, for ink maps
that are already ink = 1 on 0), so the networks see a glyph the same way whatever the size of the
image, where the glyph sits in it, how large it is drawn and which polarity it has:

1. `ink_maps`: grey levels of either polarity -> ink = 1 on background 0 (the paper is the median
   of the image's border, made even first where a photograph lit it unevenly; the ink is
   stretched to the darkest, or brightest, stroke; specks far smaller than a touch of the pen,
   dust on a scan, are made paper).
2. `frame`: the glyph's bounding box (pixels of at least `INK_THRESHOLD` of the image's strongest
   ink) is scaled, aspect ratio kept, so its longer side spans `BOX` of the `size` pixels of the
   output, and the glyph is centred in it by its ink's centre of mass; each output pixel is the
   area mean of the source pixels it covers (exact box filtering, so thin strokes survive a large
   reduction and a small glyph is enlarged without holes), and the result is scaled so its
   strongest pixel is full ink. Nothing of the source is cropped but what falls beyond the
   output's edge. Before that, a glyph drawn with a pen finer than `FINE` of its longer side
   (a stroke width measured by `stroke_widths`) has its strokes widened to `PEN` of it,
   Omniglot's median.

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
- Fine strokes widened, wide ones left as drawn. A pen under 5% of the glyph (Omniglot's run from
  6% to 11%) reaches the 28-pixel input as a line one pixel wide and part-inked, a glyph the
  model reads worse than the same one in Omniglot's pen however the ink is scaled: widened to
  8%, a 1-pixel pen on a 420-pixel canvas scores 1.2 points under plain drawings instead of 4.1.
  Only 86 of Omniglot's 32,460 drawings are that fine. Wide pens are left as they are:
  eroding them to Omniglot's width gained 1.6 points on thick pens and lost 13 on coarsely
  drawn digits (`bench/robustness.py --stroke normalised`); training varies the pen instead
  (model.augment).

Works on numpy arrays (the service, which keeps torch off its request threads) and on torch
tensors on any device (training), with the same arithmetic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

# Model input side, the glyph box within it, and the ink level that counts as the glyph.
SIZE = 28
BOX = 20
INK_THRESHOLD = 0.5
# Strokes finer than FINE of the glyph's longer side are widened to PEN of it (Omniglot's median).
FINE = 0.05
PEN = 0.08


# (mask, present, (top, bottom, left, right), extent) of each glyph of a batch: see _glyph
Glyph = tuple[Any, Any, tuple[Any, Any, Any, Any], Any]


def canonical(greys: np.ndarray, size: int = SIZE, box: int = BOX, centre: str = "mass",
              fine: float = FINE, pen: float = PEN) -> np.ndarray:
    """Grey levels (n, H, W) of either polarity -> model inputs (n, size, size) float32."""
    return frame(ink_maps(greys), size, box, centre, fine, pen)


def frame(ink: Any, size: int = SIZE, box: int = BOX, centre: str = "mass", fine: float = FINE,
          pen: float = PEN) -> Any:
    """Ink maps (n, H, W) in [0, 1], numpy or torch -> (n, size, size) of the same kind.

    Blank images (no ink at the threshold) come back all background. `centre` "box" centres the
    glyph by its bounding box instead of its ink's centre of mass (the alternative the robustness
    benchmark compares, `--centre box`); `fine` and `pen` are the widening's limit and target,
    as shares of the glyph's longer side (`fine` 0 leaves every pen as drawn).
    """
    if centre not in ("box", "mass"):
        raise ValueError(f"centre must be 'box' or 'mass', got {centre!r}")
    xp = _namespace(ink)
    if xp is np:
        ink = ink.astype(np.float32, copy=False)
    glyph = _glyph(ink, xp)
    radius = _widening(glyph, xp, fine, pen)
    if not bool((radius > 0).any()):
        return _frame(ink, glyph, size, box, centre, xp)
    out = np.empty((len(ink), size, size), np.float32) if xp is np else ink.new_empty((len(ink), size, size))
    for r in sorted({int(v) for v in radius.tolist()}):
        rows = radius == r
        if r:
            widened = _widened(ink[rows], r, xp)
            out[rows] = _frame(widened, _glyph(widened, xp), size, box, centre, xp)
        else:  # as drawn: the glyphs found above
            out[rows] = _frame(ink[rows], _rows(glyph, rows), size, box, centre, xp)
    return out


def _frame(ink: Any, glyph: Glyph, size: int, box: int, centre: str, xp: Any) -> Any:
    n, height, width = ink.shape
    _, present, (top, bottom, left, right), extent = glyph
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


def _rows(glyph: Glyph, rows: Any) -> Glyph:
    mask, present, sides, extent = glyph
    return mask[rows], present[rows], tuple(side[rows] for side in sides), extent[rows]


def _glyph(ink: Any, xp: Any) -> Glyph:
    """(mask, present, (top, bottom, left, right), extent) of the glyphs of ink maps (n, H, W).

    The glyph is the ink at INK_THRESHOLD of the image's strongest or more (a thin stroke shrunk to
    a few pixels never reaches full ink); its box's sides are in source pixels and its extent is
    the box's longer side (1 for a blank image, which holds no ink to frame)."""
    n, height, width = ink.shape
    strongest = ink.reshape(n, -1).max(1)
    strongest = strongest if xp is np else strongest.values
    mask = (ink >= INK_THRESHOLD * strongest[:, None, None]) & (ink > 0)
    rows, cols = mask.any(2), mask.any(1)
    present = rows.any(1)
    top, bottom = _first(rows, xp), height - _first(xp.flip(rows, (1,)), xp)
    left, right = _first(cols, xp), width - _first(xp.flip(cols, (1,)), xp)
    extent = xp.where(present, xp.maximum(bottom - top, right - left), 1)
    return mask, present, (top, bottom, left, right), extent


def stroke_widths(ink: Any) -> tuple[Any, Any]:
    """(stroke width, glyph extent) of each ink map (n, H, W), in source pixels, numpy or torch.

    The width is twice the glyph's area over its boundary (its pixels with a 4-neighbour of
    paper): w for a long stroke w pixels wide, 2 for a 1-pixel one, whose pixels are all boundary.
    """
    xp = _namespace(ink)
    return _stroke_widths(_glyph(ink, xp), xp)


def _stroke_widths(glyph: Glyph, xp: Any) -> tuple[Any, Any]:
    mask, _, _, extent = glyph
    return _width(mask, xp), extent


def _width(mask: Any, xp: Any) -> Any:
    inner = mask[:, 1:-1, 1:-1] & mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1]
    inner = inner & mask[:, 1:-1, :-2] & mask[:, 1:-1, 2:]
    area = mask.sum((1, 2)) * 1.0
    boundary = area - inner.sum((1, 2))
    return 2 * area / xp.where(boundary > 0, boundary, 1)


def _widening(glyph: Glyph, xp: Any, fine: float, pen: float) -> Any:
    """The radius, in source pixels, by which each glyph's strokes are widened: to `pen` of its
    extent where they are finer than `fine` of it, else 0."""
    width, extent = _stroke_widths(glyph, xp)
    radius = xp.where(width < fine * extent, xp.round((pen * extent - width) / 2), 0)
    return radius.astype(np.int64) if xp is np else radius.long()


def _widened(ink: Any, radius: int, xp: Any) -> Any:
    """Ink maps (n, H, W) with their strokes widened by `radius` pixels (a square maximum filter),
    outwards at the edges too (framing is blind to where the glyph lies in its image). A radius
    of 16 or more is applied to the ink shrunk by radius // 8 (each pixel the strongest of its
    block, as the filter would make it): the same width for the glyph to within a sixteenth, the
    glyph still spans some 200 pixels, and a 4000-pixel canvas is widened in a few passes over
    images of 200 pixels a side rather than over 16 million pixels."""
    step = radius // 8
    if step > 1:
        n, height, width = ink.shape
        ink = _pad(ink, (0, -height % step), (0, -width % step), xp)
        blocks = ink.reshape(n, ink.shape[1] // step, step, ink.shape[2] // step, step)
        ink = blocks.max((2, 4)) if xp is np else blocks.amax((2, 4))
        radius = round(radius / step)
    return _max_filter(_pad(ink, (radius, radius), (radius, radius), xp), radius, xp)


def _max_filter(x: Any, radius: int, xp: Any) -> Any:
    """The maximum of each (2 radius + 1)^2 square about each pixel of x (n, H, W), ink beyond the
    image counting as 0: running maxima along each axis, the window doubled at each pass."""
    for axis in (1, 2):
        around = (radius, radius)
        y = _pad(x, around, (0, 0), xp) if axis == 1 else _pad(x, (0, 0), around, xp)
        span, window = 1, 2 * radius + 1
        while span < window:
            step = min(span, window - span)
            length = y.shape[axis] - step
            y = xp.maximum(_take(y, 0, length, axis), _take(y, step, length, axis))
            span += step
        x = y
    return x


def _pad(x: Any, rows: tuple[int, int], cols: tuple[int, int], xp: Any) -> Any:
    """x (n, H, W) with paper (0) added: rows[0] rows above, rows[1] below, cols[0] columns to the
    left, cols[1] to the right."""
    if xp is np:
        return np.pad(x, [(0, 0), rows, cols])
    return xp.nn.functional.pad(x, [*cols, *rows])


def _take(x: Any, start: int, length: int, axis: int) -> Any:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, start + length)
    return x[tuple(index)]


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
    extreme it is nearer to is the paper. Paper lit unevenly, as in a photograph, is made even
    first (`_even_paper`). Ink is then scaled from the paper's level to the darkest (or brightest)
    stroke, so a binary Omniglot PNG maps to exactly 1 - grey / 255 and faint scans or 0/1-valued
    pixel arrays are stretched to full ink. Last, specks of ink far smaller than a touch of the
    pen are made paper (`_without_specks`).
    """
    x = np.asarray(greys)
    levels = x if x.dtype == np.uint8 else x.astype(np.float32)
    border = _border(levels)
    paper, dark, lo, hi = _paper(levels, border)
    evened = _even_paper(levels, border, paper, dark, lo)
    if evened is not levels:
        levels = evened
        paper, dark, lo, hi = _paper(levels, _border(levels))
    blank = hi == lo
    scale = np.where(blank, 1.0, np.where(dark, paper - lo, hi - paper)).astype(np.float32)
    ink = levels.astype(np.float32) - paper.astype(np.float32)[:, None, None]
    np.negative(ink, out=ink, where=dark[:, None, None])  # paper - grey, exactly
    ink /= scale[:, None, None]
    ink[blank] = 0.0
    return _without_specks(np.clip(ink, 0.0, 1.0, out=ink))


SPECK = 0.25  # a piece of ink smaller than this times the square of the pen's width is a speck
FAINT = 0.1  # ink at this share of the strongest or more joins pieces: a speck's blurred rim is its own
_TOUCHING = np.ones((3, 3), bool)  # pieces of ink are 8-connected


def _without_specks(ink: np.ndarray) -> np.ndarray:
    """Ink maps (n, H, W) with their specks made paper: pieces of ink (8-connected, at FAINT of
    the strongest ink or more, so a blurred rim belongs to its piece) that hold fewer glyph
    pixels (at INK_THRESHOLD) than SPECK times the square of the stroke width.

    Dust on a scan or noise in a photograph is such a piece; left in, it stretches the glyph's box
    and shrinks the glyph (three 2x2 specks on an Omniglot drawing cost 4 points). A pen
    touched to the paper once leaves a dot of about the square of its width (0.79 of it for a
    round pen), so a character's dots stay: 4 of Omniglot's 13,180 evaluation drawings hold a
    piece under SPECK, each a stray pixel, and their smallest dot drawn on purpose is 0.36. A
    faint stroke whose ink reaches the threshold only here and there is one piece, not specks.
    The width is measured on the image's largest piece, which any amount of dust leaves as it is.
    A piece with SPECK of the largest's glyph pixels or more is never a speck (a width is at most
    the square root of its area), so an image of strokes alike is passed over after one labelling.
    Images under 8 pixels on a side are left as they are.
    """
    if min(ink.shape[1:]) < 8:  # a strip: labelling keeps some 32 bytes a pixel of its length
        return ink
    for image in ink:
        strongest = image.max()
        if strongest == 0:
            continue
        pieces, count = ndimage.label(image > FAINT * strongest, structure=_TOUCHING)
        if count < 2:
            continue
        mask = image >= INK_THRESHOLD * strongest  # the glyph's pixels, as `_glyph` finds them
        cores = np.bincount(pieces[mask], minlength=count + 1)  # each piece's glyph pixels
        largest = int(cores.argmax())
        small = np.flatnonzero((cores > 0) & (cores < SPECK * cores[largest]))
        if len(small) == 0:
            continue
        width = _width((mask & (pieces == largest))[None], np)[0]
        specks = np.zeros(count + 1, bool)
        specks[small[cores[small] < SPECK * width**2]] = True
        image[specks[pieces]] = 0.0
    return ink


def _border(levels: np.ndarray) -> np.ndarray:
    return np.concatenate([levels[:, 0], levels[:, -1], levels[:, :, 0], levels[:, :, -1]], axis=1)


def _paper(levels: np.ndarray, border: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(paper level, whether the ink is darker than it, lowest level, highest level) of each image
    (n, H, W) with its border (`_border`): the paper is the border's median, the ink the extreme
    farther from that."""
    flat = levels.reshape(len(levels), -1)
    lo, hi = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
    paper = np.median(border.astype(np.float32), axis=1).astype(np.float64)
    return paper, paper - lo >= hi - paper, lo, hi  # (dark: light paper, dark ink)


def _even_paper(levels: np.ndarray, border: np.ndarray, paper: np.ndarray, dark: np.ndarray,
                lo: np.ndarray) -> np.ndarray:
    """Images (n, H, W) of dark ink on light paper lit unevenly (a photograph, its light falling
    off across the page) with the paper made even; other images come back as they are.

    The paper's light is modelled as a plane, level + slopes along the rows and the columns,
    fitted by least squares to the medians of the border's segments (each side in four, so a
    stroke that crosses the edge moves none of them) that are paper: those within half the
    image's contrast of the border's median, then within a quarter of it of the first plane (so a
    stroke along an edge is left out). The image is divided by the plane, as light falling off
    dims paper and ink alike. Paper whose light changes by no more than EVEN of the image's contrast
    (segments all of one level: scans, drawings, screenshots) is returned untouched, as are light
    strokes on dark paper: screens send those, evenly lit.
    """
    _, height, width = levels.shape
    candidates = np.flatnonzero(dark & (border.min(axis=1) < border.max(axis=1)))  # not one level
    if min(height, width) < 2 * SEGMENTS or len(candidates) == 0:
        return levels
    paper, lo = paper[candidates], lo[candidates]
    contrast = paper - lo
    z, rows, cols = _border_segments(levels[candidates])
    plane = np.broadcast_to(paper[:, None], z.shape)
    for share in (0.5, 0.25):
        keep = np.abs(z - plane) <= share * contrast[:, None]
        level, row0, col0, slopes = _plane(z, keep, rows, cols)
        plane = (level[:, None] + slopes[:, :1] * (rows - row0[:, None])
                 + slopes[:, 1:] * (cols - col0[:, None]))
    drop = np.abs(slopes[:, 0]) * (height - 1) + np.abs(slopes[:, 1]) * (width - 1)  # corner to corner
    uneven = np.flatnonzero((drop > EVEN * contrast) & (level > 0))
    if len(uneven) == 0:
        return levels
    out = levels.astype(np.float32)
    r, c = np.arange(height, dtype=np.float64)[:, None], np.arange(width, dtype=np.float64)[None]
    for i in uneven:  # divided by the light that falls on the paper, never by less than a quarter of it
        surface = level[i] + slopes[i, 0] * (r - row0[i]) + slopes[i, 1] * (c - col0[i])
        out[candidates[i]] *= (level[i] / np.maximum(surface, level[i] / 4)).astype(np.float32)
    return out


SEGMENTS = 4  # each side of the border in this many segments, for the fit of the paper's light
EVEN = 1e-3  # paper whose light changes by less than this share of the contrast is left as it is


def _border_segments(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The median level of each segment of each image's border (n, 4 SEGMENTS), and each
    segment's middle (rows, cols) (4 SEGMENTS,)."""
    _, height, width = levels.shape
    # (the side's levels, whether it is a row (else a column), and which row or column)
    sides = [(levels[:, 0], True, 0), (levels[:, -1], True, height - 1),
             (levels[:, :, 0], False, 0), (levels[:, :, -1], False, width - 1)]
    medians, rows, cols = [], [], []
    for side, is_row, at in sides:
        for part in np.array_split(np.arange(side.shape[1]), SEGMENTS):
            medians.append(np.median(side[:, part].astype(np.float64), axis=1))
            middle = (part[0] + part[-1]) / 2
            rows.append(at if is_row else middle)
            cols.append(middle if is_row else at)
    return np.stack(medians, axis=1), np.array(rows, np.float64), np.array(cols, np.float64)


def _plane(z: np.ndarray, keep: np.ndarray, rows: np.ndarray,
           cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares planes through the kept border levels z (n, B) at (rows, cols) (B,): each
    image's (mean level, mean row, mean column, (row slope, column slope)). Centred sums, so kept
    levels all alike give slopes of 0 (to rounding); kept segments too few to fix a slope give 0."""
    count = np.maximum(keep.sum(axis=1), 1)
    mean = lambda v: (keep * v).sum(axis=1) / count  # noqa: E731
    level, row0, col0 = mean(z), mean(rows), mean(cols)
    dz, dr, dc = keep * (z - level[:, None]), keep * (rows - row0[:, None]), keep * (cols - col0[:, None])
    srr, scc, src = (dr * dr).sum(1), (dc * dc).sum(1), (dr * dc).sum(1)
    srz, scz = (dr * dz).sum(1), (dc * dz).sum(1)
    det = srr * scc - src * src
    ok = det > 1e-9 * np.maximum(srr * scc, 1)
    det = np.where(ok, det, 1)
    slopes = np.stack([np.where(ok, (scc * srz - src * scz) / det, 0),
                       np.where(ok, (srr * scz - src * srz) / det, 0)], axis=1)
    return level, row0, col0, slopes
