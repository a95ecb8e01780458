"""The canonical input transform (model/transform.py): the same glyph framed the same way whatever
its image's size, its place and size in the image, and its polarity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.transform import BOX, FINE, PEN, SIZE, canonical, frame, ink_maps, stroke_widths
from tests.model.omniglot_fixtures import draw_strokes


def glyph(seed: int = 0, size: int = 105) -> np.ndarray:
    return draw_strokes(np.random.default_rng(seed), size, n_strokes=3, width=2).astype(np.float32)


def placed(ink: np.ndarray, frame_side: int, top: int, left: int) -> np.ndarray:
    """`ink` pasted at (top, left) into an empty frame_side x frame_side image."""
    out = np.zeros((frame_side, frame_side), dtype=np.float32)
    out[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return out


def box_of(x: np.ndarray, level: float = 0.5) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero((x >= level).any(1)), np.flatnonzero((x >= level).any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_the_glyphs_longer_side_spans_the_box_centred_in_the_frame():
    ink = np.zeros((105, 105), dtype=np.float32)
    ink[30:50, 10:90] = 1.0  # 20 rows x 80 columns, off-centre
    out = frame(ink[None])[0]
    assert out.shape == (SIZE, SIZE) and out.dtype == np.float32
    top, bottom, left, right = box_of(out, 0.6)
    assert (left, right) == ((SIZE - BOX) // 2, (SIZE + BOX) // 2)  # 80 columns -> the box's 20
    assert (top, bottom) == (12, 16)  # 20 rows -> 5 of them about the centre: 11.5 to 16.5
    assert out[12:16, 4:24].min() == pytest.approx(1.0)


def test_a_glyph_framed_anywhere_in_any_image_gives_the_same_input():
    ink = glyph(1)
    plain = frame(ink[None])[0]
    elsewhere = frame(placed(ink, 300, 180, 7)[None])[0]  # a larger image, the glyph in a corner
    np.testing.assert_allclose(elsewhere, plain, atol=1e-5)


def test_a_glyph_drawn_small_frames_close_to_the_same_glyph_drawn_large():
    ink = glyph(2)
    small = ink.reshape(35, 3, 35, 3).mean((1, 3))  # the same drawing at a third of the size
    a = frame(ink[None])[0]
    b = frame(placed(small, 105, 60, 60)[None])[0]
    assert np.abs(a - b).mean() < 0.03  # only the resolution differs
    assert box_of(a, 0.3) == pytest.approx(box_of(b, 0.3), abs=1)


def test_either_polarity_and_any_grey_scale_give_the_same_input():
    ink = glyph(3)
    dark_on_light = (255 * (1 - ink)).astype(np.uint8)
    light_on_dark = (255 * ink).astype(np.uint8)
    faint = (200 + 30 * (1 - ink)).astype(np.float32)  # a faint scan: paper 230, ink 200
    want = frame(ink[None])[0]
    for grey in (dark_on_light, light_on_dark, faint):
        np.testing.assert_allclose(canonical(grey[None])[0], want, atol=1e-5)


def test_a_non_square_image_keeps_the_glyphs_aspect_ratio():
    tall = np.zeros((200, 50), dtype=np.float32)
    tall[20:180, 20:30] = 1.0  # a vertical bar 160 x 10
    out = frame(tall[None])[0]
    top, bottom, left, right = box_of(out)
    assert (top, bottom) == (4, 24)
    assert right - left <= 2  # 10 / 160 of the box's 20 pixels: about 1.25


def test_a_faint_thin_glyph_shrunk_to_a_few_pixels_is_still_found_and_brought_to_full_ink():
    tiny = np.zeros((10, 10), dtype=np.float32)
    tiny[2:8, 4] = 0.3  # a stroke that never reaches full ink
    out = frame(tiny[None])[0]
    assert out.max() == pytest.approx(1.0) and box_of(out, 0.5)[:2] == (4, 24)


def cross(side: int, arm: int, pen: int) -> np.ndarray:
    """(1, side, side): a cross centred in the image, its arms `arm` long and `pen` pixels wide."""
    out = np.zeros((1, side, side), np.float32)
    lo, hi = (side - arm) // 2, (side + arm) // 2
    mid = (side - pen) // 2
    out[0, lo:hi, mid : mid + pen] = out[0, mid : mid + pen, lo:hi] = 1.0
    return out


def test_stroke_widths_measure_the_pen_and_the_glyphs_extent():
    width, extent = stroke_widths(np.concatenate([cross(420, 400, 1), cross(420, 400, 32)]))
    assert width[0] == pytest.approx(2, abs=0.01)  # a 1-pixel stroke: all of it boundary
    assert width[1] == pytest.approx(32, rel=0.1) and extent.tolist() == [400, 400]
    by_torch = stroke_widths(torch.from_numpy(cross(420, 400, 32)))
    assert by_torch[0].item() == pytest.approx(width[1], rel=1e-5)


def test_a_fine_pen_on_a_large_canvas_frames_as_the_same_glyph_drawn_with_omniglots_pen():
    # A 1-pixel stroke across a 400-pixel glyph is 0.005 of its extent, Omniglot's pen some 0.08:
    # averaged as it is, it would reach the input as a faint trace one pixel wide.
    fine, pen = frame(cross(420, 400, 1)), frame(cross(420, 400, round(PEN * 400)))
    assert np.abs(fine - pen).mean() < 0.01 and np.abs(fine - pen).max() < 0.15
    assert ((fine > 0.5) == (pen > 0.5)).all() and fine.max() == pytest.approx(1.0)
    np.testing.assert_allclose(frame(torch.from_numpy(cross(420, 400, 1))).numpy(), fine, atol=1e-5)
    # on a 4000-pixel canvas (widened at a lower resolution) and on Omniglot's 105 pixels alike
    assert np.abs(frame(cross(4000, 3800, 1)) - pen).max() < 0.15
    omniglot = np.abs(frame(cross(105, 100, 1)) - frame(cross(105, 100, round(PEN * 100))))
    assert omniglot.mean() < 0.02 and omniglot.max() < 0.25  # 7 pixels wide where the pen is 8


def test_strokes_of_omniglots_width_or_wider_are_framed_as_drawn():
    for pen in (round(FINE * 400) + 1, 32, 80):  # just over the fine pen's limit, Omniglot's, thick
        ink = cross(420, 400, pen)
        width, extent = stroke_widths(ink)
        assert width[0] >= FINE * extent[0]
        np.testing.assert_allclose(frame(ink), frame(np.pad(ink, ((0, 0), (5, 5), (5, 5)))), atol=1e-6)
    assert np.abs(frame(cross(420, 400, 21)) - frame(cross(420, 400, 32))).max() > 0.1  # left thinner


def test_a_fine_stroke_on_the_edge_widens_outwards_too():
    edge = np.zeros((1, 100, 100), np.float32)
    edge[0, 0, :] = edge[0, :, 0] = 1.0  # an L drawn along the image's top and left edges
    inside = np.pad(edge, ((0, 0), (30, 30), (30, 30)))
    np.testing.assert_allclose(frame(edge), frame(inside), atol=1e-5)


def test_a_blank_image_frames_to_background():
    assert (frame(np.zeros((2, 40, 40), dtype=np.float32)) == 0).all()
    assert (canonical(np.full((1, 30, 30), 255, dtype=np.uint8)) == 0).all()


def test_numpy_and_torch_give_the_same_input_and_each_image_is_framed_alone():
    stack = np.stack([glyph(s) for s in range(4)])
    by_numpy = frame(stack)
    by_torch = frame(torch.from_numpy(stack))
    assert isinstance(by_torch, torch.Tensor) and by_torch.dtype == torch.float32
    np.testing.assert_allclose(by_torch.numpy(), by_numpy, atol=1e-5)
    np.testing.assert_array_equal(frame(stack[2:3])[0], by_numpy[2])


def test_ink_maps_stretch_each_image_from_its_paper_to_its_strongest_stroke():
    grey = np.full((1, 20, 20), 240.0, dtype=np.float32)
    grey[0, 5:15, 10] = 120.0  # dark ink on light paper
    ink = ink_maps(grey)[0]
    assert ink.max() == 1.0 and ink[0, 0] == 0.0
    assert ink_maps(np.full((1, 5, 5), 7, dtype=np.uint8)).max() == 0.0  # blank


def _lit(grey: np.ndarray, falloff: float, axis: int) -> np.ndarray:
    """grey (H, W) photographed with the light falling off by `falloff` along an axis."""
    along = np.linspace(0, 1, grey.shape[axis])
    light = 1 - falloff * (along[:, None] if axis == 0 else along[None, :])
    return (grey * light).astype(np.float32)


def _ring(size: int = 60, pen: float = 4) -> np.ndarray:
    """Dark ink (40) on light paper (235): a ring drawn with a pen `pen` pixels wide, as a glyph."""
    rows, cols = np.mgrid[0:size, 0:size]
    radius = np.hypot(rows - size / 2, cols - size / 2)
    return np.where(np.abs(radius - size / 4) < pen / 2, 40.0, 235.0).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1])
def test_paper_lit_unevenly_is_made_even_before_the_ink_is_found(axis: int):
    drawing = _ring()
    photographed = _lit(drawing, 0.4, axis)  # the far edge's paper (141) is darker than half the way to ink
    even = ink_maps(drawing[None])[0]
    np.testing.assert_allclose(ink_maps(photographed[None])[0], even, atol=1e-4)
    np.testing.assert_allclose(canonical(photographed[None]), canonical(drawing[None]), atol=1e-4)
    # Found on the uneven paper as it is, the glyph would be the ring and a third of the page.
    assert (ink_maps(photographed[None])[0] >= 0.5).sum() == (even >= 0.5).sum()


def test_even_paper_and_edge_strokes_leave_the_levels_as_they_are():
    drawing = _ring().astype(np.uint8)
    drawing[:, -1] = 40  # a stroke along the right edge: not a sign of uneven light
    drawing[0:3, 10:14] = 120  # an antialiased stroke crossing the top edge
    np.testing.assert_array_equal(ink_maps(drawing[None])[0], (235 - drawing.astype(np.float32)) / 195)


def test_light_strokes_on_dark_paper_are_not_evened():
    drawing = _lit(255 - _ring(), 0.4, 1)  # screens send these, evenly lit: no plane is divided out
    paper = np.median(np.concatenate([drawing[0], drawing[-1], drawing[:, 0], drawing[:, -1]]))
    expected = np.clip((drawing - paper) / (drawing.max() - paper), 0, 1)
    np.testing.assert_allclose(ink_maps(drawing[None])[0], expected, atol=1e-6)


def _dust(drawing: np.ndarray, places: list[tuple[int, int]], side: int = 2) -> np.ndarray:
    """The drawing with specks of side x side pixels, as dark as its ink, at (top, left) each."""
    out = drawing.copy()
    for top, left in places:
        out[top : top + side, left : left + side] = 40.0
    return out


def test_dust_specks_on_the_paper_are_left_out_of_the_glyph():
    drawing = _ring(pen=6)
    dusty = _dust(drawing, [(2, 2), (3, 50), (55, 30)])
    np.testing.assert_array_equal(ink_maps(dusty[None]), ink_maps(drawing[None]))
    np.testing.assert_array_equal(canonical(dusty[None]), canonical(drawing[None]))


def test_a_specks_faint_rim_goes_with_it():
    drawing = _ring(pen=6)
    dusty = _dust(drawing, [(4, 4)])
    dusty[3:7, 3:7] = np.minimum(dusty[3:7, 3:7], 200.0)  # the rim a scan or JPEG blurs about it
    dusty[4:6, 4:6] = 40.0
    np.testing.assert_array_equal(ink_maps(dusty[None]), ink_maps(drawing[None]))


def test_a_characters_dot_drawn_with_its_pen_stays():
    drawing = _ring(pen=6)
    rows, cols = np.mgrid[0:60, 0:60]
    dotted = np.where(np.hypot(rows - 6, cols - 30) < 3, 40.0, drawing).astype(np.float32)  # a pen's touch
    ink = ink_maps(dotted[None])[0]
    np.testing.assert_array_equal(ink, (235 - dotted) / 195)
    assert box_of(ink)[0] == box_of(235 - dotted)[0] == 4  # the glyph's box takes the dot in


def test_much_dust_leaves_the_pens_width_and_the_glyph_as_they_are():
    drawing = _ring(pen=6)
    grains = np.random.default_rng(0).integers(1, 58, (150, 2))
    grains = [(r, c) for r, c in grains if (drawing[r - 1 : r + 2, c - 1 : c + 2] == 235).all()]
    salted = _dust(drawing, grains, side=1)  # on the paper, none touching the ring
    assert len(grains) > 100
    ink = ink_maps(salted[None])[0]
    np.testing.assert_array_equal(ink, ink_maps(drawing[None])[0])


def test_each_image_tells_specks_by_its_own_pen():
    fine, broad = _ring(pen=3), _ring(pen=8)
    # A 3x3 piece is a dot for the fine pen (9 pixels, a pen's touch) and dust for the broad one;
    # the blank page beside them holds no piece at all.
    blank = np.full_like(fine, 235)
    pieces = np.stack([_dust(fine, [(2, 2)], side=3), blank, _dust(broad, [(2, 2)], side=3)])
    ink = ink_maps(pieces)
    np.testing.assert_array_equal(ink[0], (235 - pieces[0]) / 195)
    assert ink[1].max() == 0
    np.testing.assert_array_equal(ink[2], ink_maps(broad[None])[0])
    np.testing.assert_array_equal(ink_maps(pieces[1:])[1], ink[2])  # two pieces for two images


def test_frame_refuses_what_is_not_an_array():
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        frame([[0.0]])


def test_the_inks_centre_of_mass_lands_in_the_middle_where_the_boxs_would_not():
    ink = np.zeros((1, 60, 60), dtype=np.float32)
    ink[0, 10:50, 10:14] = 1.0  # a heavy bar on the left
    ink[0, 29:31, 14:40] = 1.0  # a thin arm to the right: the box's centre is at column 25
    by_box, by_mass = frame(ink, centre="box")[0], frame(ink)[0]
    columns = np.arange(28) + 0.5
    assert abs((by_box.sum(0) * columns).sum() / by_box.sum() - 14) > 2
    assert (by_mass.sum(0) * columns).sum() / by_mass.sum() == pytest.approx(14, abs=0.1)
    np.testing.assert_allclose(frame(torch.from_numpy(ink), centre="mass")[0].numpy(), by_mass, atol=1e-5)
    with pytest.raises(ValueError, match="centre must be 'box' or 'mass'"):
        frame(ink, centre="middle")
