"""The engine's per-forward thread choice: small CPU forwards run on one torch thread."""

from __future__ import annotations

import pytest
import torch

from service.engine import _threads_for


@pytest.fixture
def team() -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_a_small_forward_runs_on_one_thread_and_the_team_comes_back(team: int) -> None:
    with _threads_for(True):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == team


def test_the_team_comes_back_when_the_forward_fails(team: int) -> None:
    with pytest.raises(ValueError), _threads_for(True):
        raise ValueError("a bad batch")
    assert torch.get_num_threads() == team


def test_a_large_forward_keeps_the_whole_team(team: int) -> None:
    with _threads_for(False):
        assert torch.get_num_threads() == team
