"""The engine's per-call thread count: small CPU forwards (and every forward beside other model
workers) run on one torch thread, registrations on the whole team."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from service.inference.decoding import Deferred
from service.inference.engine import _parts, _threads_for, overload_demand, serving_shape
from service.settings import Settings


@pytest.fixture
def team() -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_a_call_runs_on_the_threads_asked_for_and_the_count_comes_back(team: int) -> None:
    with _threads_for(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == team
    with _threads_for(team):
        assert torch.get_num_threads() == team


def test_the_count_comes_back_when_the_call_fails(team: int) -> None:
    with pytest.raises(ValueError), _threads_for(1):
        raise ValueError("a bad batch")
    assert torch.get_num_threads() == team


def test_each_worker_thread_keeps_its_own_count(team: int) -> None:
    """Two model workers side by side: one inside a one-thread forward must not shrink the other's
    registration (OpenMP keeps the count per thread)."""
    inside, seen = threading.Event(), {}

    def one() -> None:
        with _threads_for(1):
            inside.set()
            seen["one"] = torch.get_num_threads()
            done.wait(5)

    done = threading.Event()
    worker = threading.Thread(target=one)
    worker.start()
    assert inside.wait(5)
    try:
        seen["team"] = torch.get_num_threads()  # this thread's count, untouched by the worker's
    finally:
        done.set()
        worker.join()
    assert seen == {"one": 1, "team": team}


@pytest.mark.parametrize(("n", "most", "sizes"), [
    (1, 32, [1]), (32, 32, [32]), (33, 32, [16, 17]), (128, 32, [32] * 4), (12, 5, [4, 4, 4]),
    (7, 1, [1] * 7),
])
def test_a_request_is_split_into_the_fewest_near_equal_parts(n: int, most: int, sizes: list[int]) -> None:
    parts = _parts(n, most)
    assert [stop - start for start, stop in parts] == sizes
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))


def test_a_deferred_part_prepares_its_own_images_by_their_place_in_the_request() -> None:
    seen = []

    def prepare(start: int, stop: int) -> np.ndarray:
        seen.append((start, stop))
        return np.zeros((stop - start, 2, 2), np.float32)

    whole = Deferred(10, prepare)
    part = whole.part(6, 10)
    assert len(part) == 4 and part.inputs().shape == (4, 2, 2)
    assert len(whole.inputs()) == 10
    assert seen == [(6, 10), (0, 10)]


@pytest.mark.parametrize(("settings", "device", "team", "shape"), [
    ({"processes": 1}, "cpu", 2, (2, 1, 32)),  # one process: two workers of one thread each
    ({"processes": 2}, "cpu", 2, (1, 1, 32)),  # two processes share the 2 cores: one worker each
    ({"processes": 2}, "cpu", 16, (2, 4, 128)),
    ({"processes": 4}, "cpu", 2, (1, 1, 32)),  # more processes than cores: still one thread
    ({"processes": 2, "backend": "onnx"}, "cpu", 2, (1, 1, 16)),  # onnxruntime's best are smaller
    ({"processes": 2, "backend": "onnx"}, "cpu", 16, (2, 4, 64)),
    ({"processes": 2, "model_workers": 3, "batch_max_images": 8}, "cpu", 8, (3, 1, 8)),
    ({"processes": 1}, "cuda", 8, (1, 8, 256)),
])
def test_the_serving_shape_splits_the_cores_between_processes_then_workers(settings, device, team, shape):
    assert serving_shape(Settings(**settings), torch.device(device), team) == shape


@pytest.mark.parametrize(("settings", "device", "workers", "threads", "demand"), [
    ({}, "cpu", 1, 1, 24),  # a process of the two on 2 cores: 1.5 x 16, whatever the largest forward
    ({"backend": "onnx"}, "cpu", 1, 1, 24),
    ({}, "cpu", 2, 4, 192),
    ({"batch_max_images": 8}, "cpu", 2, 1, 24),  # a set forward bound is the round: 1.5 x 8 x 2
    ({"overload_demand": 5, "batch_max_images": 8}, "cpu", 2, 1, 5),
    ({}, "cuda", 1, 8, 384),
])
def test_the_overload_bound_by_device_counts_a_round_of_one_image_requests(settings, device, workers,
                                                                           threads, demand):
    assert overload_demand(Settings(**settings), torch.device(device), workers, threads) == demand
