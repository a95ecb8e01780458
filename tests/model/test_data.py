"""White-box tests of model/data.py: the three on-disk layouts, preprocessing to 28x28 ink = 1, the
background/validation split and the episode sampler. Fixtures are tiny synthetic drawings built here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.data import (
    DATA_DIR_ENV,
    EpisodeSampler,
    Jitter,
    OmniglotSplit,
    load_split,
    to_model_input,
    train_val_split,
)
from tests.model.omniglot_fixtures import (
    draw_characters,
    layout_names,
    png_files,
    write_npz,
    write_png_folder,
    write_zip,
)

N_ALPHABETS, CHARS_PER_ALPHABET, N_DRAWINGS = 2, 2, 3


@pytest.fixture
def drawings() -> np.ndarray:
    """(4, 3, 105, 105) uint8, ink = 1; drawing (0, 0) is a solid band over the top 30 rows."""
    ink = draw_characters(np.random.default_rng(0), N_ALPHABETS * CHARS_PER_ALPHABET, N_DRAWINGS)
    ink[0, 0] = 0
    ink[0, 0, :30] = 1
    return ink


@pytest.fixture
def layouts(tmp_path, drawings) -> dict[str, object]:
    """The same drawings in three directories, one per layout."""
    alphabets, characters = layout_names(N_ALPHABETS, CHARS_PER_ALPHABET)
    files = png_files("images_background", drawings, alphabets, characters)
    dirs = {name: tmp_path / name for name in ("npz", "folder", "zip")}
    for d in dirs.values():
        d.mkdir()
    write_npz(dirs["npz"] / "omniglot_background.npz", drawings, alphabets, characters)
    write_png_folder(dirs["folder"], files)
    write_zip(dirs["zip"] / "images_background.zip", files)
    return {name: load_split(d, "background") for name, d in dirs.items()}


@pytest.mark.parametrize("layout", ["npz", "folder", "zip"])
def test_load_split_reads_each_layout_as_28x28_float_images(layouts, layout):
    split = layouts[layout]
    assert split.images.shape == (4, N_DRAWINGS, 28, 28)
    assert split.images.dtype == np.float32
    assert split.images.min() >= 0.0 and split.images.max() <= 1.0
    assert split.alphabet.tolist() == ["Alphabet_00", "Alphabet_00", "Alphabet_01", "Alphabet_01"]
    assert split.character.tolist() == ["character01", "character02"] * 2
    assert split.alphabets == ["Alphabet_00", "Alphabet_01"]


@pytest.mark.parametrize("layout", ["npz", "folder", "zip"])
def test_load_split_gives_ink_one_and_background_zero(layouts, layout):
    band = layouts[layout].images[0, 0]  # ink over the top 30 of 105 rows -> top 8 of 28 rows
    assert (band[:7] == 1.0).all()
    assert (band[9:] == 0.0).all()


@pytest.mark.parametrize("layout", ["npz", "folder", "zip"])
def test_load_split_keeps_the_mean_ink_of_each_drawing(layouts, layout, drawings):
    # Area averaging: a drawing's ink fraction survives the 105 -> 28 shrink (roughly: the windows
    # of adaptive pooling overlap by a pixel).
    np.testing.assert_allclose(
        layouts[layout].images.mean(axis=(-2, -1)), drawings.mean(axis=(-2, -1)), rtol=0.1, atol=2e-3
    )


def test_the_three_layouts_give_the_same_arrays_for_the_same_drawings(layouts):
    for other in ("folder", "zip"):
        np.testing.assert_allclose(layouts[other].images, layouts["npz"].images, rtol=0, atol=1e-6)
        assert layouts[other].alphabet.tolist() == layouts["npz"].alphabet.tolist()
        assert layouts[other].character.tolist() == layouts["npz"].character.tolist()


def test_load_split_prefers_npz_over_png_folders(tmp_path, drawings):
    alphabets, characters = layout_names(N_ALPHABETS, CHARS_PER_ALPHABET)
    write_npz(tmp_path / "omniglot_background.npz", drawings, alphabets, characters)
    write_png_folder(tmp_path, png_files("images_background", drawings[:1], alphabets[:1], characters[:1]))
    assert load_split(tmp_path, "background").images.shape[0] == 4


def test_load_split_reads_the_directory_named_by_the_environment(tmp_path, drawings, monkeypatch):
    alphabets, characters = layout_names(N_ALPHABETS, CHARS_PER_ALPHABET)
    write_npz(tmp_path / "omniglot_evaluation.npz", drawings, alphabets, characters)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_split(None, "evaluation").images.shape == (4, N_DRAWINGS, 28, 28)


def test_load_split_refuses_an_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(tmp_path, "train")


def test_load_split_explains_a_missing_directory_or_layout(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        load_split(None, "background")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(tmp_path / "nowhere", "background")
    with pytest.raises(FileNotFoundError, match="omniglot_background.npz"):
        load_split(tmp_path, "background")


def test_to_model_input_pads_non_square_images_to_a_centred_square():
    wide = np.zeros((28, 56), dtype=np.float32)
    wide[:, 24:32] = 1.0  # a vertical bar in the middle
    x = to_model_input(wide)
    assert x.shape == (28, 28)
    assert x[:7].sum() == 0 and x[-7:].sum() == 0  # the padding went above and below
    assert (x[7:21, 12:16] == 1.0).all()


def test_to_model_input_keeps_leading_axes_and_clamps_to_0_1():
    x = to_model_input(np.full((2, 3, 105, 105), 1.5, dtype=np.float32))
    assert x.shape == (2, 3, 28, 28) and x.dtype == torch.float32
    assert (x == 1.0).all()


# ------------------------------------------------------------------------- train/val split


def _split_of_alphabets(n: int) -> OmniglotSplit:
    names = np.array([f"Alphabet_{i:02d}" for i in range(n)])
    return OmniglotSplit(np.zeros((n, 1, 28, 28), np.float32), names, names)


def test_train_val_split_holds_out_four_of_the_thirty_background_alphabets():
    train, val = train_val_split(_split_of_alphabets(30))
    assert val.alphabets == ["Alphabet_06", "Alphabet_13", "Alphabet_20", "Alphabet_27"]
    assert len(train.alphabets) == 26 and not set(train.alphabets) & set(val.alphabets)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_train_val_split_keeps_at_least_one_alphabet_to_train_on(n):
    train, val = train_val_split(_split_of_alphabets(n))
    assert len(train.alphabets) >= 1 and len(val.alphabets) >= 1
    assert sorted(train.alphabets + val.alphabets) == _split_of_alphabets(n).alphabets


def test_train_val_split_of_one_alphabet_trains_on_it():
    train, val = train_val_split(_split_of_alphabets(1))
    assert train.alphabets == ["Alphabet_00"] and val.alphabets == []


# --------------------------------------------------------------------------- episode sampler


def test_episode_sampler_builds_n_way_k_shot_episodes_with_class_ids(tiny_split):
    sampler = EpisodeSampler(tiny_split, rotate=True)
    ep = sampler.sample(np.random.default_rng(0), n_way=5, n_shot=2, n_query=3)
    assert ep.n_way == 5
    assert ep.support_x.shape == (10, 1, 28, 28) and ep.query_x.shape == (15, 1, 28, 28)
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_y.tolist() == [k for k in range(5) for _ in range(3)]
    assert ep.support_x.dtype == torch.float32


def test_episode_sampler_without_rotation_draws_distinct_drawings_of_one_character_per_class(tiny_split):
    sampler = EpisodeSampler(tiny_split, rotate=False)
    ep = sampler.sample(np.random.default_rng(1), n_way=4, n_shot=2, n_query=4)
    images = torch.from_numpy(tiny_split.images)
    for k in range(4):
        drawn = torch.cat([ep.support_x[ep.support_y == k], ep.query_x[ep.query_y == k]])[:, 0]
        matches = [(c, d) for x in drawn for c in range(8) for d in range(6) if torch.equal(x, images[c, d])]
        assert len(matches) == 6 and len({c for c, _ in matches}) == 1  # one character
        assert len({d for _, d in matches}) == 6  # no drawing twice


def test_rotation_makes_each_class_a_character_turned_by_one_multiple_of_90_degrees(tiny_split):
    two_chars = OmniglotSplit(tiny_split.images[:2], tiny_split.alphabet[:2], tiny_split.character[:2])
    sampler = EpisodeSampler(two_chars, rotate=True)
    ep = sampler.sample(np.random.default_rng(2), n_way=8, n_shot=1, n_query=2)  # every (char, turn)
    images = torch.from_numpy(two_chars.images)
    seen = set()
    for k in range(8):
        drawn = torch.cat([ep.support_x[ep.support_y == k], ep.query_x[ep.query_y == k]])[:, 0]
        found = {
            (c, turns)
            for x in drawn
            for c in range(2)
            for turns in range(4)
            if any(torch.equal(x, torch.rot90(images[c, d], turns, dims=(-2, -1))) for d in range(6))
        }
        assert len(found) == 1, "every image of a class is the same character at the same turn"
        seen |= found
    assert seen == {(c, turns) for c in range(2) for turns in range(4)}


def test_episode_sampler_refuses_episodes_the_split_cannot_fill(tiny_split):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="9-way episodes need 9 classes; the split has 8"):
        EpisodeSampler(tiny_split, rotate=False).sample(rng, n_way=9, n_shot=1, n_query=1)
    with pytest.raises(ValueError, match="exceed the 6 drawings"):
        EpisodeSampler(tiny_split, rotate=True).sample(rng, n_way=2, n_shot=2, n_query=5)


def test_episode_sampler_is_reproducible_from_its_generator(tiny_split):
    sampler = EpisodeSampler(tiny_split, rotate=True)
    a = sampler.sample(np.random.default_rng(3), n_way=3, n_shot=1, n_query=2)
    b = sampler.sample(np.random.default_rng(3), n_way=3, n_shot=1, n_query=2)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


# --------------------------------------------------------------------------- training jitter


def test_jitter_moves_each_drawing_on_its_own_and_keeps_its_shape_and_ink(tiny_split):
    images = torch.from_numpy(tiny_split.images[:, 0]).unsqueeze(1)  # 8 drawings
    moved = Jitter(shift=2, rotate=10, scale=0.1, prob=1.0)(images, np.random.default_rng(0))
    assert moved.shape == images.shape and moved.dtype == images.dtype
    assert all(not torch.allclose(m, x) for m, x in zip(moved, images, strict=True))
    assert moved.min() >= 0 and moved.max() <= 1 + 1e-6  # bilinear: ink stays in [0, 1]
    ink = images.sum((1, 2, 3))
    assert torch.allclose(moved.sum((1, 2, 3)), ink, rtol=0.35)  # moved and zoomed, not wiped out


def test_a_pure_shift_of_whole_pixels_moves_a_drawing_exactly():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10:14, 8:12] = 1.0

    class Fixed:  # a generator whose draws give a shift of exactly +2 px on both axes
        def uniform(self, low, high, size):
            return np.full(size, high)

        def random(self, n):
            return np.zeros(n)

    moved = Jitter(shift=2, prob=1.0)(x, Fixed())
    # affine_grid maps output to input points: the drawing moves by -2 px on both axes.
    assert torch.allclose(moved, torch.roll(x, (-2, -2), dims=(2, 3)), atol=1e-5)


def test_jitter_prob_is_the_share_of_drawings_moved_the_rest_pass_bit_for_bit(tiny_split):
    images = torch.from_numpy(tiny_split.images.reshape(-1, 28, 28)).unsqueeze(1)  # 48 drawings
    moved = Jitter(shift=2, rotate=10, prob=0.5)(images, np.random.default_rng(1))
    same = [torch.equal(m, x) for m, x in zip(moved, images, strict=True)]
    assert 10 <= sum(same) <= 38  # about half, and the others exactly as they were
    assert not Jitter(shift=2, prob=0.0).active and not Jitter(prob=1.0).active


@pytest.mark.parametrize("kwargs, message", [
    ({"shift": -1}, "jitter shift must be a finite number, 0 or more, got -1"),
    ({"rotate": float("nan")}, "jitter rotate must be a finite number, 0 or more, got nan"),
    ({"shift": float("inf")}, "jitter shift must be a finite number, 0 or more, got inf"),
    ({"scale": 1.0}, "jitter scale must be below 1, got 1.0"),
    ({"prob": 1.5}, "jitter prob is a probability, got 1.5"),
])
def test_jitter_refuses_impossible_settings_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Jitter(**kwargs)


def test_a_jittered_sampler_is_reproducible_and_keeps_classes_and_labels(tiny_split):
    plain = EpisodeSampler(tiny_split, rotate=True)
    jittered = EpisodeSampler(tiny_split, rotate=True, jitter=Jitter(shift=2, rotate=10, prob=1.0))
    a = jittered.sample(np.random.default_rng(3), n_way=3, n_shot=2, n_query=2)
    b = jittered.sample(np.random.default_rng(3), n_way=3, n_shot=2, n_query=2)
    c = plain.sample(np.random.default_rng(3), n_way=3, n_shot=2, n_query=2)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert a.support_x.shape == c.support_x.shape and a.query_x.shape == c.query_x.shape
    assert torch.equal(a.support_y, c.support_y) and torch.equal(a.query_y, c.query_y)
    assert not torch.equal(a.query_x, c.query_x)  # the same drawings, moved
    # An inactive jitter leaves the sampler what it was: same draws, same images.
    idle = EpisodeSampler(tiny_split, rotate=True, jitter=Jitter()).sample(
        np.random.default_rng(3), n_way=3, n_shot=2, n_query=2)
    assert torch.equal(idle.query_x, c.query_x)
