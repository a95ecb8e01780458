"""Startup: the server says where it listens; weights that cannot be loaded safely stop it with a
clear message and status 1; weights are never unpickled."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from api_tests.helpers import REPO, Server


def test_the_server_says_where_it_listens_in_a_line_a_person_reads(server: Server) -> None:
    lines = [json.loads(line)["message"] for line in server.log_path.read_text().splitlines()
             if "listening on" in line and '"logger": "service"' in line]
    assert lines == [f"MetaNet service listening on {server.url} (docs at /docs, demo at /)"]


def test_server_with_a_missing_checkpoint_exits_1_naming_the_file(tmp_data: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no-weights-here"
    empty.mkdir()
    server = Server(tmp_data, checkpoint=empty).start(wait=False)
    assert server.process is not None
    assert server.process.wait(timeout=180) == 1
    log = server.log_tail()
    assert "CheckpointError" in log and "no-weights-here" in log and "is missing" in log, log


def copy_of_the_shipped_weights(tmp_path: Path) -> Path:
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("config.json", "metanet.safetensors"):
        (weights / name).write_bytes((REPO / "model" / "weights" / name).read_bytes())
    return weights


def test_server_with_weights_that_do_not_match_their_config_exits_1_saying_so(tmp_data, tmp_path) -> None:
    weights = copy_of_the_shipped_weights(tmp_path)
    config = json.loads((weights / "config.json").read_text())
    config["model"]["channels"] = 32  # every conv tensor now has the wrong shape for the config
    (weights / "config.json").write_text(json.dumps(config))
    server = Server(tmp_data, checkpoint=weights).start(wait=False)
    assert server.process is not None
    assert server.process.wait(timeout=180) == 1
    log = server.log_tail()
    assert "CheckpointError" in log and "the config needs" in log, log


def test_server_never_unpickles_a_pickle_posing_as_weights(tmp_data, tmp_path) -> None:
    weights = copy_of_the_shipped_weights(tmp_path)
    planted = tmp_path / "unpickled"

    class Payload:  # unpickling this creates `planted`: the file must never appear
        def __reduce__(self) -> tuple:
            return (open, (str(planted), "w"))

    (weights / "metanet.safetensors").write_bytes(pickle.dumps(Payload()))
    server = Server(tmp_data, checkpoint=weights).start(wait=False)
    assert server.process is not None
    assert server.process.wait(timeout=180) == 1
    assert "is not a readable safetensors file" in server.log_tail()
    assert not planted.exists()
