"""Shared fixtures of the model tests: a tiny MetaNet after a fixed seed and a few synthetic glyphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import MetaNet, MetaNetConfig
from model.data import OmniglotSplit
from tests.model.omniglot_fixtures import draw_characters, draw_strokes

TINY = MetaNetConfig(channels=8, rep_dim=8, hidden_dim=8, max_way=6, max_examples=12)


@pytest.fixture(autouse=True)
def _few_threads():
    # A training job shares this machine: the tiny tensors here gain nothing from more threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config() -> MetaNetConfig:
    return TINY


@pytest.fixture
def model() -> MetaNet:
    torch.manual_seed(0)
    return MetaNet(TINY).eval()


def glyphs(n: int, seed: int) -> torch.Tensor:
    """n random-stroke images of shape (n, 1, 28, 28), float32, ink = 1."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([draw_strokes(rng, 28, width=1) for _ in range(n)])).float()[:, None]


@pytest.fixture
def support() -> tuple[torch.Tensor, list[str]]:
    """A 3-way 2-shot support set: (6, 1, 28, 28) images and their labels."""
    return glyphs(6, seed=1), ["alpha", "beta", "gamma", "alpha", "beta", "gamma"]


@pytest.fixture
def queries() -> torch.Tensor:
    return glyphs(4, seed=2)


@pytest.fixture
def tiny_split() -> OmniglotSplit:
    """8 characters x 6 drawings at 28x28 (two alphabets), as load_split returns them."""
    ink = draw_characters(np.random.default_rng(3), n_chars=8, n_drawings=6, size=28)
    alphabets = np.array(["Alpha"] * 4 + ["Beta"] * 4)
    characters = np.array([f"character{i % 4 + 1:02d}" for i in range(8)])
    return OmniglotSplit(ink.astype(np.float32), alphabets, characters)
