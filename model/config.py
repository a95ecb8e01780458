"""Hyperparameters of the MetaNet architecture and of its meta-training.

Both are frozen dataclasses saved as JSON beside the weights, so a checkpoint rebuilds its own model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MetaNetConfig:
    """Architecture of the Omniglot MetaNet (`MetaNetFull` in the authors' code)."""

    image_size: int = 28
    channels: int = 64  # filters of every 3x3 conv of u and b
    n_blocks: int = 5  # [conv, relu, 2x2 ceil max-pool] blocks: 28 -> 14 -> 7 -> 4 -> 2 -> 1
    rep_dim: int = 64  # size of the representation r
    hidden_dim: int = 64  # b's FC 64 -> 64 layer
    max_way: int = 50  # heads are sized for this many classes; unused logits are masked
    max_examples: int = 100  # largest support set a task may hold (M grows by P floats per example)
    n_chunks: int = 5  # T: how many gradients of u's loss feed the LSTM meta learner d
    meta_hidden: int = 20  # width of m's MLP and of d's LSTM
    grad_p: float = 7.0  # p of the log/sign gradient preprocessing (Andrychowicz et al. 2016)

    def __post_init__(self) -> None:
        # A config read from a checkpoint's JSON must fail here, as a ValueError, rather than deep
        # inside tensor construction (load_model turns ValueError into CheckpointError).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = (int, float) if f.name == "grad_p" else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
                raise ValueError(f"{f.name} must be a positive {kinds[-1].__name__}, got {value!r}")
        side = self.image_size
        for _ in range(self.n_blocks):
            side = -(-side // 2)  # ceil-mode 2x2 pooling
        if side != 1:
            raise ValueError(
                f"image_size {self.image_size} does not shrink to 1x1 after {self.n_blocks} pools"
            )
        if self.max_way < 2:
            raise ValueError("max_way must be at least 2")
        if self.max_examples < 2:
            raise ValueError("max_examples must be at least 2")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MetaNetConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """Meta-training recipe (Adam 1e-3, clip 10, one episode per update, 90-degree rotations)."""

    model: MetaNetConfig = field(default_factory=MetaNetConfig)
    episodes: int = 60_000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 10.0
    # Step decay: the learning rate halves every lr_halve_every episodes (0 keeps it constant, as the
    # authors' code does). Our budgets are tens of thousands of episodes, and a decayed rate turns
    # the late, noisy part of training into accuracy.
    lr_halve_every: int = 4000
    # The step the halving counts from: a resumed run that restarts its schedule (a warm restart at
    # a new lr) sets it to the step it resumes at, so the rate starts at lr again there.
    lr_schedule_start: int = 0
    # Each episode draws n_way uniformly from [min_way, max_train_way] and, with probability
    # multi_shot_prob, n_shot uniformly from [2, max_shot] (else 1): one model serves every size.
    # Training must reach max_way: a model trained only up to 20-way answers at chance at 21-way
    # (the untrained slots of the softmax layer outvote the trained ones).
    min_way: int = 2
    max_train_way: int = 50
    max_shot: int = 5
    multi_shot_prob: float = 0.3
    query_per_class: int = 10
    max_queries: int = 100  # cap on queries per episode (large ways get fewer per class)
    rotate: bool = True
    # Training-only jitter of a share `jitter_prob` of the drawings (model.data.Jitter): up to this
    # many pixels of shift, degrees of turn and relative zoom; all 0 = none (the paper's recipe: the
    # 90-degree turns only).
    jitter_shift: float = 0.0
    jitter_rotate: float = 0.0
    jitter_scale: float = 0.0
    jitter_prob: float = 0.5  # the share of drawings jittered
    val_every: int = 500
    val_episodes: int = 200
    val_ways: tuple[int, ...] = (20, 50)  # 1-shot validation settings; model selection uses their mean
    checkpoint_every: int = 250
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["model"] = MetaNetConfig.from_dict(data.get("model", {}))
        data["betas"] = tuple(data.get("betas", (0.9, 0.999)))
        if "val_way" in data:  # runs saved before val_ways existed
            data["val_ways"] = (data.pop("val_way"), data["model"].max_way)
        data["val_ways"] = tuple(data.get("val_ways", (20, 50)))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
