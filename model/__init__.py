"""MetaNet (Munkhdalai & Yu, ICML 2017): the model, its data, training and evaluation."""

from model.config import MetaNetConfig, TrainConfig
from model.errors import CheckpointError, InvalidTaskError, MetaNetError
from model.metanet import ClassifyOutput, MetaNet, TaskMemory

__all__ = [
    "CheckpointError",
    "ClassifyOutput",
    "InvalidTaskError",
    "MetaNet",
    "MetaNetConfig",
    "MetaNetError",
    "TaskMemory",
    "TrainConfig",
]
