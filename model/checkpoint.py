"""Weights on disk: safetensors plus a JSON config, never pickles.

A weights directory holds `metanet.safetensors` and `config.json` ({"model": MetaNetConfig, ...}).
`load_model()` with no path loads the shipped weights in `model/weights/`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import MetaNetConfig
from model.errors import CheckpointError
from model.metanet import MetaNet

WEIGHTS_FILE = "metanet.safetensors"
CONFIG_FILE = "config.json"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"


def save_weights(
    model: MetaNet, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write the model's weights and config; returns the directory. Atomic per file."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(out / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    meta = {"model": model.config.to_dict(), **(extra or {})}
    _atomic(out / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return out


def load_model(
    path: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu"
) -> MetaNet:
    """Build a MetaNet from a weights directory (default: the shipped weights), in eval mode.

    Refuses, with a CheckpointError naming the problem, a missing file, a config that is not
    valid JSON, and tensors whose names, shapes or dtypes do not match the config.
    """
    directory = Path(path) if path is not None else SHIPPED_WEIGHTS
    return _load(directory / WEIGHTS_FILE, directory / CONFIG_FILE).to(device).eval()


def _load(weights_path: Path, config_path: Path, drop: tuple[str, ...] = ()) -> MetaNet:
    for required in (weights_path, config_path):
        if not required.is_file():
            raise CheckpointError(f"checkpoint file {required} is missing")
    try:
        meta = json.loads(config_path.read_text())
        config = MetaNetConfig.from_dict(meta["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_path} is not a valid MetaNet config: {exc}") from exc
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    for name in drop:
        state.pop(name, None)
    model = MetaNet(config)
    # Weights saved before calibration existed answer with their raw softmax; weights calibrated
    # with one temperature for every task use it for every number of classes.
    temperature = state.setdefault("temperature", torch.ones(()))
    if temperature.ndim == 0:
        state["temperature"] = temperature.expand(config.max_way + 1).clone()
    _check_state_matches(model, state, weights_path)
    model.load_state_dict(state)
    model.version = weights_version(weights_path)
    trained = meta.get("trained_max_way")
    if trained is not None:
        if not isinstance(trained, int) or not 2 <= trained <= config.max_way:
            raise CheckpointError(
                f"{config_path}: trained_max_way must be an integer in [2, {config.max_way}], got {trained!r}"
            )
        model.max_way = trained
    return model


def average_weights(
    sources: list[str | os.PathLike[str]], directory: str | os.PathLike[str]
) -> MetaNet:
    """The element-wise mean of weight sets of one architecture, written to `directory`.

    A source is a weights directory, or a safetensors file beside a `config.json` (a training
    run's `last/average.safetensors`, its moving average: alone, it is written as weights). Weights
    of one run average into a model that sits nearer the centre of the minimum they wander about
    (Wortsman et al., 2022, "model soups"). The confidence temperatures are reset to 1: calibrate the result.
    """
    if not sources:
        raise ValueError("averaging takes one weight set or more")
    config, states = None, []
    for source in map(Path, sources):
        weights_path = source if source.suffix == ".safetensors" else source / WEIGHTS_FILE
        # A moving average's file also counts the steps it averaged, which no model holds.
        model = _load(weights_path, weights_path.parent / CONFIG_FILE, drop=("n_averaged",))
        if config is not None and model.config != config:
            raise CheckpointError(f"{source} is a different architecture from {sources[0]}: "
                                  f"{model.config.to_dict()} against {config.to_dict()}")
        config = model.config
        states.append((model.state_dict(), model.max_way))
    averaged = MetaNet(config)
    mean = {name: torch.stack([state[name] for state, _ in states]).mean(0) for name in states[0][0]}
    mean["temperature"] = torch.ones_like(mean["temperature"])
    averaged.load_state_dict(mean)
    averaged.max_way = min(max_way for _, max_way in states)
    save_weights(averaged, directory, extra={"trained_max_way": averaged.max_way,
                                             "averaged_from": [str(s) for s in sources]})
    return load_model(directory)


def weights_version(weights_path: Path) -> str:
    """Model version: a short content hash of the weights file, so equal bytes = equal version."""
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    return f"metanet-{digest[:12]}"


def _check_state_matches(model: MetaNet, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for name, tensor in expected.items():
        got = state[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise CheckpointError(
                f"{path}: tensor {name} is {got.dtype} {tuple(got.shape)}, "
                f"the config needs {tensor.dtype} {tuple(tensor.shape)}"
            )
        if not torch.isfinite(got).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")


def _atomic(target: Path, write: Any) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)
