"""The ONNX query path: export, its sidecar, and parity with torch on the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import CheckpointError, MetaNet
from model.checkpoint import load_model
from model.onnx import OnnxQueryPath, export_onnx, input_names
from tests.model.conftest import glyphs

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def shipped() -> MetaNet:
    return load_model(None, "cpu")


@pytest.fixture(scope="module")
def exported(shipped: MetaNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(shipped, tmp_path_factory.mktemp("onnx") / "metanet.onnx")


def test_export_writes_the_graph_and_a_sidecar_naming_the_weights(shipped: MetaNet, exported: Path) -> None:
    import onnx

    graph = onnx.load(str(exported)).graph
    assert [i.name for i in graph.input] == input_names(shipped)
    assert [o.name for o in graph.output] == ["probs", "attention", "similarity"]
    sidecar = json.loads(Path(f"{exported}.json").read_text())
    assert sidecar["model_version"] == shipped.version and sidecar["max_way"] == shipped.config.max_way


def test_the_runner_refuses_a_graph_exported_from_other_weights(exported: Path, model: MetaNet) -> None:
    model.version = "metanet-other"
    with pytest.raises(CheckpointError, match="export it again"):
        OnnxQueryPath(exported, model)


@pytest.mark.slow
def test_onnx_matches_torch_within_1e_4_on_50_random_tasks(shipped: MetaNet, exported: Path) -> None:
    """max |p_onnx - p_torch| <= 1e-4 over 50 random tasks of 2..20 classes, one to three examples
    a class (uneven), 1..8 queries each; attention and similarity too."""
    runner = OnnxQueryPath(exported, shipped, threads=1)
    rng = np.random.default_rng(0)
    worst_probs = worst_attention = 0.0
    for task in range(50):
        way = int(rng.integers(2, 21))
        labels = [f"c{k}" for k in range(way)] + [f"c{k}" for k in rng.integers(0, way, size=way)]
        labels = labels[: int(rng.integers(way, len(labels) + 1))]
        n_query = int(rng.integers(1, 9))
        images = glyphs(len(labels) + n_query, seed=task)
        memory = shipped.register(images[: len(labels)], labels)
        queries = images[len(labels) :]
        want = shipped.classify(memory, queries, return_attention=True)
        got = runner.classify(memory, queries, return_attention=True)
        assert got.probs.shape == want.probs.shape == (n_query, memory.n_way)
        worst_probs = max(worst_probs, float((got.probs - want.probs).abs().max()))
        worst_attention = max(worst_attention, float((got.attention - want.attention).abs().max()))
        worst_attention = max(worst_attention, float((got.similarity - want.similarity).abs().max()))
    print(f"\nONNX vs torch, 50 tasks: max |dp| {worst_probs:.2e}, |d attention| {worst_attention:.2e}")
    assert worst_probs <= 1e-4
    assert worst_attention <= 1e-4


def test_the_runner_refuses_a_graph_of_other_inputs(exported: Path, shipped: MetaNet, tmp_path: Path) -> None:
    old = tmp_path / "old.onnx"
    old.write_bytes(exported.read_bytes())
    sidecar = json.loads(Path(f"{exported}.json").read_text())
    sidecar["inputs"] = [name for name in sidecar["inputs"] if name != "attention_bias"]
    Path(f"{old}.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="older version"):
        OnnxQueryPath(old, shipped)


def test_onnx_takes_a_half_precision_memory(shipped: MetaNet, exported: Path) -> None:
    runner = OnnxQueryPath(exported, shipped, threads=1)
    images = glyphs(6, seed=1)
    memory = shipped.register(images[:4], ["a", "b", "a", "b"]).with_m_dtype(torch.float16)
    want = shipped.classify(memory, images[4:])
    got = runner.classify(memory, images[4:])
    assert float((got.probs - want.probs).abs().max()) <= 1e-4


def test_small_batches_run_on_a_one_thread_session_with_the_same_answers(shipped, exported) -> None:
    runner = OnnxQueryPath(exported, shipped, threads=2, one_thread_below=4)
    assert runner._solo is not runner.session
    assert runner._solo.get_session_options().intra_op_num_threads == 1
    images = glyphs(10, seed=2)
    memory = shipped.register(images[:4], ["a", "b", "c", "d"])
    want = shipped.classify(memory, images[4:])
    for n in (1, 3, 6):  # below the threshold on the solo session, then on the team
        got = runner.classify(memory, images[4 : 4 + n])
        assert float((got.probs - want.probs[:n]).abs().max()) <= 1e-4
    single = OnnxQueryPath(exported, shipped, threads=1, one_thread_below=4)
    assert single._solo is single.session  # already one thread: no second session
