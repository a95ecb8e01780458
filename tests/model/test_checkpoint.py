"""White-box tests of model/checkpoint.py: weights round-trip through safetensors + JSON, and loading
refuses, with a CheckpointError, anything it cannot trust (never falling back to pickle).
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, InvalidTaskError, MetaNet, MetaNetConfig
from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, average_weights, load_model, save_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def saved(tmp_path, model):
    return save_weights(model, tmp_path / "weights", extra={"step": 7})


def test_save_weights_writes_safetensors_and_a_json_config(saved, model):
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    meta = json.loads((saved / CONFIG_FILE).read_text())
    assert meta["step"] == 7
    assert MetaNetConfig.from_dict(meta["model"]) == model.config
    assert set(load_file(str(saved / WEIGHTS_FILE))) == set(model.state_dict())


def test_a_model_rebuilt_from_saved_weights_registers_and_classifies_identically(
    saved, model, support, queries
):
    rebuilt = load_model(saved)
    assert not rebuilt.training
    assert rebuilt.config == model.config
    first, second = model.register(*support), rebuilt.register(*support)
    for a, b in zip((first.R, first.M, *first.Q_fast), (second.R, second.M, *second.Q_fast), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model.classify(first, queries).probs, rebuilt.classify(second, queries).probs)


def test_the_version_is_a_hash_of_the_weights_bytes(saved, tmp_path, model):
    version = load_model(saved).version
    assert re.fullmatch(r"metanet-[0-9a-f]{12}", version)
    assert load_model(save_weights(model, tmp_path / "again")).version == version
    with torch.no_grad():
        model.b_out.add_(1.0)
    assert load_model(save_weights(model, tmp_path / "changed")).version != version


def test_load_model_without_a_path_loads_the_shipped_weights():
    shipped = load_model()
    assert isinstance(shipped, MetaNet) and shipped.version.startswith("metanet-")


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE])
def test_load_model_refuses_a_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing} is missing"):
        load_model(saved)


def test_load_model_refuses_a_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is missing"):
        load_model(tmp_path / "nowhere")


def test_load_model_refuses_a_config_that_does_not_match_the_tensor_shapes(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    meta["model"]["channels"] = 16  # the weights have 8
    (saved / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        load_model(saved)
    assert str(saved / WEIGHTS_FILE) in str(info.value)
    # e.g. "tensor u_fc is torch.float32 (8, 8), the config needs torch.float32 (8, 16)"
    needs = re.search(
        r"tensor \S+ is torch\.float32 \(([0-9, ]+)\), the config needs torch\.float32 \(([0-9, ]+)\)",
        str(info.value),
    )
    assert needs and "16" not in needs[1] and "16" in needs[2]


def test_load_model_refuses_weights_with_missing_or_extra_tensors(saved):
    state = load_file(str(saved / WEIGHTS_FILE))
    del state["b_out"]
    state["surprise"] = torch.zeros(1)
    save_file(state, str(saved / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"missing \['b_out'\], unexpected \['surprise'\]"):
        load_model(saved)


@pytest.mark.parametrize("saved_temperature", [None, 1.7])
def test_weights_with_no_temperature_or_one_for_every_task_load_as_a_table_of_it(saved, saved_temperature):
    state = load_file(str(saved / WEIGHTS_FILE))
    del state["temperature"]
    if saved_temperature is not None:
        state["temperature"] = torch.tensor(saved_temperature)
    save_file(state, str(saved / WEIGHTS_FILE))
    loaded = load_model(saved)
    expected = torch.full((loaded.config.max_way + 1,), saved_temperature or 1.0)
    torch.testing.assert_close(loaded.temperature, expected)


def test_load_model_refuses_weights_of_another_dtype(saved):
    state = {k: v.double() for k, v in load_file(str(saved / WEIGHTS_FILE)).items()}
    save_file(state, str(saved / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="float64"):
        load_model(saved)


def test_load_model_refuses_weights_holding_nan(saved):
    state = load_file(str(saved / WEIGHTS_FILE))
    state["b_fc"][0, 0] = float("nan")
    save_file(state, str(saved / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="b_fc holds NaN"):
        load_model(saved)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda blob: blob[: len(blob) // 2],  # truncated
        lambda blob: b"\xff" * 16 + blob[16:],  # header length and header overwritten
        lambda blob: b"",
    ],
    ids=["truncated", "bad-header", "empty"],
)
def test_load_model_refuses_a_corrupted_safetensors_file(saved, corrupt):
    path = saved / WEIGHTS_FILE
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load_model(saved)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        "[1, 2]",
        '{"no_model": {}}',
        '{"model": {"channels": 8, "colour": "red"}}',
        '{"model": {"image_size": 64}}',
        '{"model": {"channels": "8"}}',
        '{"model": {"channels": -1}}',
        '{"model": {"n_chunks": 0}}',
    ],
    ids=[
        "garbage",
        "empty",
        "list",
        "no-model-key",
        "unknown-field",
        "invalid-geometry",
        "string-width",
        "negative-width",
        "no-chunks",
    ],
)
def test_load_model_refuses_a_config_that_is_not_a_valid_metanet_config(saved, text):
    (saved / CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match="is not a valid MetaNet config"):
        load_model(saved)


def test_load_model_refuses_a_pickle_in_place_of_safetensors(saved, model):
    (saved / WEIGHTS_FILE).write_bytes(pickle.dumps(model.state_dict()))
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load_model(saved)


def test_load_model_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_model must not unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert isinstance(load_model(saved), MetaNet)


def test_weights_trained_on_smaller_tasks_refuse_larger_ones(tmp_path, model):
    limited = load_model(save_weights(model, tmp_path / "w", extra={"trained_max_way": 3}))
    assert limited.max_way == 3
    images = torch.rand(4, 1, 28, 28)
    limited.register(images[:3], ["a", "b", "c"])
    with pytest.raises(InvalidTaskError, match="at most max_way=3") as info:
        limited.register(images, ["a", "b", "c", "d"])
    assert info.value.field == "labels"


@pytest.mark.parametrize("bad", [1, "3", 10_000, 2.5])
def test_load_model_refuses_a_trained_max_way_outside_the_heads(tmp_path, model, bad):
    with pytest.raises(CheckpointError, match="trained_max_way"):
        load_model(save_weights(model, tmp_path / "w", extra={"trained_max_way": bad}))


def test_averaged_weights_are_the_element_wise_mean_at_temperature_one(tmp_path, model):
    first = save_weights(model, tmp_path / "first")
    other = MetaNet(model.config)
    with torch.no_grad():
        other.temperature.fill_(2.5)
    # A run's moving average: a safetensors file beside a config.json, counting its steps.
    (tmp_path / "run").mkdir()
    save_weights(other, tmp_path / "run")
    state = {**other.state_dict(), "n_averaged": torch.tensor(40)}
    save_file(state, str(tmp_path / "run" / "average.safetensors"))

    averaged = average_weights([first, tmp_path / "run" / "average.safetensors"], tmp_path / "mean")
    assert averaged.config == model.config and averaged.version == load_model(tmp_path / "mean").version
    for name, tensor in averaged.state_dict().items():
        if name == "temperature":
            assert torch.equal(tensor, torch.ones_like(tensor))
        else:
            torch.testing.assert_close(tensor, (model.state_dict()[name] + other.state_dict()[name]) / 2,
                                       rtol=0, atol=0, msg=name)
    meta = json.loads((tmp_path / "mean" / CONFIG_FILE).read_text())
    assert meta["averaged_from"] == [str(first), str(tmp_path / "run" / "average.safetensors")]


def test_a_lone_moving_average_is_written_as_weights_at_temperature_one(tmp_path, model):
    (tmp_path / "run").mkdir()
    save_weights(model, tmp_path / "run")
    average = tmp_path / "run" / "average.safetensors"
    save_file({**model.state_dict(), "n_averaged": torch.tensor(40)}, str(average))
    written = average_weights([average], tmp_path / "out").state_dict()
    for name, tensor in model.state_dict().items():
        expected = torch.ones_like(tensor) if name == "temperature" else tensor
        torch.testing.assert_close(written[name], expected, rtol=0, atol=0, msg=name)


def test_averaging_refuses_other_architectures_no_source_and_missing_files(tmp_path, model):
    first = save_weights(model, tmp_path / "first")
    wider = save_weights(MetaNet(MetaNetConfig(channels=16, rep_dim=8, hidden_dim=8, max_way=6,
                                               max_examples=12)), tmp_path / "wider")
    with pytest.raises(CheckpointError, match="wider is a different architecture"):
        average_weights([first, wider], tmp_path / "out")
    with pytest.raises(ValueError, match="one weight set or more"):
        average_weights([], tmp_path / "out")
    with pytest.raises(CheckpointError, match="nowhere.safetensors is missing"):
        average_weights([first, tmp_path / "nowhere.safetensors"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_metanet_average_writes_the_mean_and_names_a_bad_source(tmp_path, model):
    first = save_weights(model, tmp_path / "first")
    second = save_weights(MetaNet(model.config), tmp_path / "second")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.cli", "average", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)

    done = cli(str(first), str(second), "--out", str(tmp_path / "mean"))
    assert done.returncode == 0, done.stderr
    assert load_model(tmp_path / "mean").version in done.stdout and "metanet calibrate" in done.stdout
    done = cli(str(first), str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and not (tmp_path / "bad").exists()
    assert f"metanet average: error: checkpoint file {tmp_path / 'nowhere' / WEIGHTS_FILE} is missing" \
        in done.stderr
