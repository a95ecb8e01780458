"""White-box tests of model/data.py: the three on-disk layouts, the framing to 28x28 ink = 1, the
background/validation split and the episode sampler (uneven shots, augmentation). Fixtures are tiny
synthetic drawings built here.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from model.augment import Augment
from model.data import (
    DATA_DIR_ENV,
    EpisodeSampler,
    OmniglotSplit,
    frame_drawings,
    load_split,
    paper_split,
    scoring_split,
    train_val_split,
    training_splits,
)
from model.transform import frame
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
def test_load_split_frames_each_drawing_with_ink_one_and_background_zero(layouts, layout):
    # A band 30 rows high across the 105 columns: framed, its 105 columns span the box's 20 pixels,
    # so its 30 rows span 30 * 20 / 105 = 5.7, centred on row 14 (rows 11.1 to 16.9).
    band = layouts[layout].images[0, 0]
    assert (band[12:16, 4:24] == 1.0).all()
    assert (band[:11] == 0.0).all() and (band[18:] == 0.0).all()
    assert (band[:, :4] == 0.0).all() and (band[:, 24:] == 0.0).all()


@pytest.mark.parametrize("layout", ["npz", "folder", "zip"])
def test_load_split_keeps_the_drawings_as_drawn_beside_the_framed_ones(layouts, layout, drawings):
    split = layouts[layout]
    np.testing.assert_array_equal(split.raw, drawings)
    np.testing.assert_allclose(split.images, frame_drawings(drawings), rtol=0, atol=1e-6)
    kept = split.select_alphabets({"Alphabet_01"})
    np.testing.assert_array_equal(kept.raw, drawings[2:])


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


# ------------------------------------------------------------------ uneven shots, augmentation


def test_an_uneven_episode_gives_each_class_its_own_number_of_shots(tiny_split):
    ep = EpisodeSampler(tiny_split, rotate=False).sample(np.random.default_rng(0), 3, [1, 3, 2], 2)
    assert ep.support_y.tolist() == [0, 1, 1, 1, 2, 2]
    assert ep.query_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert ep.support_x.shape == (6, 1, 28, 28) and ep.query_x.shape == (6, 1, 28, 28)
    with pytest.raises(ValueError, match="2 shot counts for 3 classes"):
        EpisodeSampler(tiny_split, rotate=False).sample(np.random.default_rng(0), 3, [1, 2], 2)


def test_a_balanced_episode_given_as_a_list_of_shots_is_the_same_episode(tiny_split):
    sampler = EpisodeSampler(tiny_split, rotate=True)
    a = sampler.sample(np.random.default_rng(4), 3, 2, 2)
    b = sampler.sample(np.random.default_rng(4), 3, [2, 2, 2], 2)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert torch.equal(a.support_y, b.support_y)


@pytest.fixture
def drawn_split() -> OmniglotSplit:
    """6 characters x 5 drawings as drawn at 105x105, framed as load_split frames them."""
    raw = draw_characters(np.random.default_rng(7), n_chars=6, n_drawings=5, size=105)
    names = np.array([f"character{i:02d}" for i in range(6)])
    return OmniglotSplit(frame_drawings(raw), np.array(["Alpha"] * 6), names, raw)


def test_an_augmenting_sampler_varies_drawings_and_keeps_classes_and_labels(drawn_split):
    plain = EpisodeSampler(drawn_split, rotate=True)
    varied = EpisodeSampler(drawn_split, rotate=True, augment=Augment(prob=1.0))
    a = varied.sample(np.random.default_rng(3), 3, [1, 2, 1], 2)
    b = varied.sample(np.random.default_rng(3), 3, [1, 2, 1], 2)
    c = plain.sample(np.random.default_rng(3), 3, [1, 2, 1], 2)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)  # reproducible
    assert torch.equal(a.support_y, c.support_y) and torch.equal(a.query_y, c.query_y)
    assert a.query_x.shape == c.query_x.shape
    assert not torch.equal(a.query_x, c.query_x)
    assert a.query_x.min() >= 0 and a.query_x.max() <= 1


def test_an_inactive_augment_or_a_split_without_drawings_leaves_the_sampler_plain(drawn_split, tiny_split):
    c = EpisodeSampler(drawn_split, rotate=True).sample(np.random.default_rng(3), 3, 2, 2)
    idle = EpisodeSampler(drawn_split, rotate=True, augment=Augment(prob=0.0))
    assert torch.equal(idle.sample(np.random.default_rng(3), 3, 2, 2).query_x, c.query_x)
    assert EpisodeSampler(tiny_split, rotate=True, augment=Augment(prob=1.0)).augment is None


def test_the_plain_drawings_of_an_augmenting_sampler_are_the_framed_ones(drawn_split):
    """Drawings not chosen for augmenting are framed from the drawing exactly as load_split does."""
    sampler = EpisodeSampler(drawn_split, rotate=False, augment=Augment(prob=1e-9))
    ep = sampler.sample(np.random.default_rng(5), 2, 1, 1)
    plain = EpisodeSampler(drawn_split, rotate=False).sample(np.random.default_rng(5), 2, 1, 1)
    torch.testing.assert_close(ep.support_x, plain.support_x, atol=1e-5, rtol=0)  # torch vs numpy
    torch.testing.assert_close(frame(torch.from_numpy(drawn_split.raw[0, :2]).float()),
                               torch.from_numpy(drawn_split.images[0, :2]), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the 1,200 / 423 split


def test_the_1200_423_split_refuses_a_data_set_without_its_characters(layouts, tmp_path, drawings):
    alphabets, characters = layout_names(N_ALPHABETS, CHARS_PER_ALPHABET)
    for split in ("background", "evaluation"):
        write_npz(tmp_path / f"omniglot_{split}.npz", drawings, alphabets, characters)
    with pytest.raises(FileNotFoundError, match="names 595 characters the data set lacks"):
        paper_split(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        training_splits(tmp_path, "1623")


def test_the_1200_423_split_of_the_real_data_set_trains_on_1028_validates_on_172_tests_on_423():
    if not os.environ.get(DATA_DIR_ENV):
        pytest.fail(f"set {DATA_DIR_ENV} to the Omniglot directory")
    parts = paper_split(None)
    names = {k: set(zip(v.alphabet.tolist(), v.character.tolist(), strict=True)) for k, v in parts.items()}
    assert [len(names[k]) for k in ("train", "val", "test")] == [1028, 172, 423]
    assert len(names["train"] | names["val"] | names["test"]) == 1623  # disjoint, all of Omniglot
    assert parts["val"].alphabets == ["Armenian", "Bengali", "Early_Aramaic", "Hebrew",
                                      "Mkhedruli_(Georgian)"]
    assert ("Gurmukhi", "character42") in names["test"] and ("Gurmukhi", "character41") in names["train"]
    assert parts["test"].raw is not None and parts["test"].images.shape[1:] == (20, 28, 28)
    train, val = training_splits(None, "1200")
    assert np.array_equal(train.character, parts["train"].character) and np.array_equal(val.alphabet,
                                                                                      parts["val"].alphabet)
    assert np.array_equal(scoring_split(None, "1200").images, parts["test"].images)
