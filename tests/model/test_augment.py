"""Training augmentation (model/augment.py): pens, turns, shifts and low resolutions, each drawing on
its own, framed as the service frames what users send."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.augment import Augment, _pen
from model.transform import frame
from tests.model.omniglot_fixtures import draw_characters


@pytest.fixture
def drawings() -> torch.Tensor:
    return torch.from_numpy(draw_characters(np.random.default_rng(0), 4, 4, size=105).reshape(16, 105, 105))


def test_every_drawing_comes_back_framed_and_reproducible(drawings):
    augment = Augment(prob=1.0)
    a = augment(drawings, np.random.default_rng(1), 28)
    b = augment(drawings, np.random.default_rng(1), 28)
    assert a.shape == (16, 28, 28) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    plain = frame(drawings.float())
    assert all(not torch.allclose(x, y) for x, y in zip(a, plain, strict=True))
    assert (a.flatten(1).amax(1) > 0.2).all()  # nothing wiped out, low resolutions included


def test_prob_is_the_share_of_drawings_changed_the_rest_are_framed_as_they_are(drawings):
    out = Augment(prob=0.5)(drawings, np.random.default_rng(2), 28)
    plain = frame(drawings.float())
    same = [torch.allclose(x, y, atol=1e-6) for x, y in zip(out, plain, strict=True)]
    assert 2 <= sum(same) <= 14
    assert torch.equal(Augment(prob=0.0)(drawings, np.random.default_rng(2), 28), plain)


def test_the_pen_thins_or_thickens_strokes():
    x = torch.zeros(3, 1, 21, 21)
    x[:, 0, 8:13, 2:19] = 1.0  # a stroke 5 pixels wide
    out = _pen(x, np.array([-1, 0, 2]))
    widths = [int(out[k, 0, :, 10].sum()) for k in range(3)]
    assert widths == [3, 5, 9]


def test_low_resolution_drawings_lose_detail(drawings):
    still = Augment(prob=1.0, rotate=0, shift=0, pen_max=0, low_res=0.0)
    coarse = Augment(prob=1.0, rotate=0, shift=0, pen_max=0, low_res=1.0, sizes=(10,))
    sharp = still(drawings, np.random.default_rng(3), 28)  # the same pens: the same generator
    assert (coarse(drawings, np.random.default_rng(3), 28) - sharp).abs().mean() > 0.02


def test_an_episode_pen_gives_every_drawing_of_the_episode_the_same_pen(drawings):
    out = Augment(prob=0.0, episode_pen=1.0)(drawings, np.random.default_rng(4), 28)
    assert not torch.allclose(out, frame(drawings.float()), atol=1e-6)  # never the plain pen
    with_pen = {pen: frame(_pen(drawings[:, None].float(), np.full(len(drawings), pen))[:, 0])
                for pen in (-1, 1, 2, 3)}
    assert sum(torch.allclose(out, x, atol=1e-6) for x in with_pen.values()) == 1
    # Over many episodes, every pen but the plain one comes up.
    rng = np.random.default_rng(5)
    firsts = [Augment(prob=0.0, episode_pen=1.0)(drawings[:1], rng, 28) for _ in range(40)]
    seen = {pen for f in firsts for pen, x in with_pen.items() if torch.allclose(f, x[:1], atol=1e-6)}
    assert seen == {-1, 1, 2, 3}


def test_episode_pens_and_drawing_pens_combine(drawings):
    augment = Augment(prob=1.0, episode_pen=0.5)
    a = augment(drawings, np.random.default_rng(6), 28)
    assert torch.equal(a, augment(drawings, np.random.default_rng(6), 28))
    assert Augment(prob=0.0, episode_pen=0.5).active and not Augment(prob=0.0).active


@pytest.mark.parametrize("kwargs, message", [
    ({"episode_pen": 1.2}, "augment episode_pen is a probability, got 1.2"),
    ({"prob": 1.5}, "augment prob is a probability, got 1.5"),
    ({"low_res": -0.1}, "augment low_res is a probability, got -0.1"),
    ({"rotate": float("nan")}, "augment rotate must be a finite number, 0 or more, got nan"),
    ({"shift": -2.0}, "augment shift must be a finite number, 0 or more, got -2.0"),
    ({"pen_max": -1}, "augment pen_max must be 0 or more, got -1"),
    ({"sizes": (2,)}, "augment sizes must be frame sides of 4 pixels or more"),
])
def test_impossible_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Augment(**kwargs)
