"""Hyperparameters of the MetaNet architecture and of its meta-training.

Both are frozen dataclasses saved as JSON beside the weights, so a checkpoint rebuilds its own model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

# How training and testing divide Omniglot (model.data): "background" trains on the background set
# less the validation alphabets (`train_val_split`) and tests on the evaluation set; "1200" is the
# split of the paper's headline figures, 1,200 characters to train and validate on and 423 to test
# on (`paper_split`).
TRAINING_SPLITS = ("background", "1200")


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
    # The authors' code applies a ReLU to the representation before the auxiliary FC layer of u's
    # representation loss (the gradients fed to d). False, the default, is the head this project
    # trained without it: a checkpoint whose config lacks the key keeps the head it was trained with.
    aux_relu: bool = False

    def __post_init__(self) -> None:
        # A config read from a checkpoint's JSON must fail here, as a ValueError, rather than deep
        # inside tensor construction (load_model turns ValueError into CheckpointError).
        if not isinstance(self.aux_relu, bool):
            raise ValueError(f"aux_relu must be true or false, got {self.aux_relu!r}")
        for f in dataclasses.fields(self):
            if f.name == "aux_relu":
                continue
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
    """Meta-training recipe (Adam 1e-3, clip 10, one episode per update, 90-degree rotations, and
    what users' images ask for beyond the paper: uneven shots and augmentation)."""

    model: MetaNetConfig = field(default_factory=MetaNetConfig)
    episodes: int = 60_000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 10.0
    # The rate halves when validation has not improved for lr_patience episodes (0: constant, as
    # in the authors' code), never below min_lr.
    lr_patience: int = 0
    min_lr: float = 1e-5
    # Each episode draws n_way from [min_way, max_train_way] and, with probability
    # multi_shot_prob, n_shot uniformly from [2, max_shot] (else 1): one model serves every size.
    # n_way is drawn with probability proportional to n_way ** -way_power: 0 draws it uniformly,
    # where a 5..50 mix meets 5 classes in one episode of 46; 1 makes 5-way 10 times as likely as
    # 50-way, for a model whose few-class answers swing between checkpoints.
    # Training must reach max_way: a model trained only up to 20-way answers at chance at 21-way
    # (the untrained slots of the softmax layer outvote the trained ones).
    min_way: int = 2
    max_train_way: int = 50
    way_power: float = 0.0
    max_shot: int = 5
    multi_shot_prob: float = 0.3
    # The share of episodes whose classes each draw their own number of shots from [1, max_shot]:
    # users' support sets are uneven.
    uneven_prob: float = 0.0
    query_per_class: int = 10
    max_queries: int = 100  # cap on queries per episode (large ways get fewer per class)
    rotate: bool = True
    # Training-only augmentation (model.augment.Augment) of a share `augment_prob` of the drawings:
    # turns of up to augment_rotate degrees, shifts of up to augment_shift source pixels, pens from
    # one pixel thinner to augment_pen_max thicker, and a share augment_low_res drawn at a low
    # resolution. 0 = none (the paper's recipe: the 90-degree turns only). In a share
    # augment_episode_pen of the episodes every drawing has one pen (thinner or thicker), as a
    # user's support set and queries do.
    augment_prob: float = 0.0
    augment_rotate: float = 15.0
    augment_shift: float = 4.0
    augment_pen_max: int = 3
    augment_low_res: float = 0.4
    augment_episode_pen: float = 0.0
    # An exponential moving average of the slow weights, moved (1 - average_decay) of the way to
    # them every episode (0: none), validated beside them and written to the run's `average/`.
    average_decay: float = 0.0
    val_every: int = 500
    val_episodes: int = 300
    # 1-shot validation settings; model selection uses their mean. Both of the paper's: a run's
    # 5-way accuracy swings between checkpoints (94.5 to 97.8% on 300 tasks) while its 20-way
    # validation holds steady, so 20-way alone cannot tell a checkpoint that lost 5-way.
    val_ways: tuple[int, ...] = (5, 20)
    checkpoint_every: int = 250
    seed: int = 0
    # The characters to train and validate on, one of TRAINING_SPLITS: "background", Omniglot's
    # background set less 4 validation alphabets, or "1200", the 1,200 of the 1,200 / 423 split
    # (validating on its 172), for a figure beside the paper's headline; tested on the evaluation
    # set or the 423 (`model.data.scoring_split`).
    split: str = "background"
    # Episodes per optimizer step, all of one shape (n_way, shots, n_query), their loss computed in
    # one batched pass (`MetaNet.batched_episode_loss`) and averaged. 1 is the paper's one episode
    # per update, run by `MetaNet.episode_loss`.
    # `episodes`, `val_every`, `checkpoint_every` and `lr_patience` count episodes, not steps.
    episodes_per_step: int = 1
    # bfloat16 autocast for u's and b's conv trunks and b's query path; the meta information (the
    # gradients fed to m and d, their preprocessing, m and d themselves) stays float32. Runs on a
    # CPU (tested). Its GPU speedup is measured by `python bench/train_throughput.py --modes
    # fp32,bf16`: none on an H200 (0.74 to 1.06 of fp32 at the same episodes a step, measured while
    # d's LSTM still ran on cuDNN; the convolutions are not what a step waits on). Off by default.
    bf16: bool = False
    # torch.compile of the batched query read (`model.metanet.read_batched`: u with each episode's Q*,
    # the attention, W* and b). It compiles without graph breaks on a CPU (tested). Its GPU speedup
    # is measured by `python bench/train_throughput.py --modes fp32,compile`: 1.01 on an H200 at
    # 20-way 1-shot, 8 episodes a step. Each new episode shape costs a compile. Off by default.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.split not in TRAINING_SPLITS:
            raise ValueError(f"split must be one of {', '.join(TRAINING_SPLITS)}, got {self.split!r}")
        if not (self.way_power >= 0 and math.isfinite(self.way_power)):
            raise ValueError(f"way_power must be a finite number, 0 or more, got {self.way_power!r}")
        if not 0 <= self.average_decay < 1:
            raise ValueError(f"average_decay must be in [0, 1), got {self.average_decay!r}")
        if isinstance(self.episodes_per_step, bool) or not isinstance(self.episodes_per_step, int) \
                or self.episodes_per_step < 1:
            raise ValueError(f"episodes_per_step must be a positive int, got {self.episodes_per_step!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["model"] = MetaNetConfig.from_dict(data.get("model", {}))
        data["betas"] = tuple(data.get("betas", (0.9, 0.999)))
        if "val_way" in data:  # run directories that name one validation way
            data["val_ways"] = (data.pop("val_way"), data["model"].max_way)
        data["val_ways"] = tuple(data.get("val_ways", (20,)))
        # Settings an older run directory may hold that no recipe uses: a step schedule, and a
        # jitter of the 28x28 inputs (augmentation works on the drawings, before framing).
        for legacy in ("lr_halve_every", "lr_schedule_start", "jitter_shift", "jitter_rotate",
                       "jitter_scale", "jitter_prob"):
            data.pop(legacy, None)
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Named training recipes, the one place they are written down (`python bench/gpu_train.py --preset`).
PRESETS: dict[str, TrainConfig] = {
    # The authors' recipe: Adam at a constant 1e-3 (no schedule), gradient-norm clipping at 10, 10
    # queries a class, the representation loss's head with their ReLU (aux_relu). With the episode
    # mix this project's run ended on, from the first step: n_way 5..50, mostly one-shot (15% with
    # 2..5 shots), a quarter of the episodes uneven, half the drawings augmented, 30% of the
    # episodes drawn with one pen throughout.
    "paper": TrainConfig(
        model=MetaNetConfig(aux_relu=True),
        lr=1e-3,
        lr_patience=0,
        grad_clip=10.0,
        min_way=5,
        max_train_way=50,
        max_shot=5,
        multi_shot_prob=0.15,
        uneven_prob=0.25,
        query_per_class=10,
        augment_prob=0.5,
        augment_episode_pen=0.3,
        val_every=1000,
        val_episodes=300,
        val_ways=(5, 20),
    ),
}
# The same recipe on the 1,200 / 423 split and without augmentation or uneven episodes, as the
# paper trained: its 423 test characters give the figure to set beside the paper's 98.95 / 97.00.
# Not for shipping (the evaluation alphabets are in its training set).
PRESETS["paper-1200"] = dataclasses.replace(PRESETS["paper"], split="1200", augment_prob=0.0,
                                           augment_episode_pen=0.0, uneven_prob=0.0)
