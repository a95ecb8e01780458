"""White-box tests of model/config.py: the architecture and training dataclasses validate themselves and
round-trip through the JSON saved beside the weights."""

from __future__ import annotations

import json

import pytest

from model import MetaNetConfig, TrainConfig


def test_the_tiny_test_config_is_a_valid_architecture(tiny_config):
    assert (tiny_config.channels, tiny_config.max_way, tiny_config.max_examples) == (8, 6, 12)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 64}, "does not shrink to 1x1 after 5 pools"),
        ({"max_way": 1}, "max_way must be at least 2"),
        ({"max_examples": 1}, "max_examples must be at least 2"),
        ({"channels": "8"}, "channels must be a positive int, got '8'"),
        ({"channels": 0}, "channels must be a positive int, got 0"),
        ({"n_chunks": -1}, "n_chunks must be a positive int"),
        ({"max_way": 6.0}, "max_way must be a positive int"),
        ({"rep_dim": True}, "rep_dim must be a positive int"),
        ({"grad_p": 0.0}, "grad_p must be a positive float"),
    ],
)
def test_metanet_config_refuses_an_impossible_architecture(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MetaNetConfig(**changes)


@pytest.mark.parametrize("image_size", [17, 28, 32])
def test_any_image_size_that_pools_down_to_one_pixel_is_accepted(image_size):
    assert MetaNetConfig(image_size=image_size).image_size == image_size


def test_metanet_config_round_trips_through_json(tiny_config):
    assert MetaNetConfig.from_dict(json.loads(json.dumps(tiny_config.to_dict()))) == tiny_config


def test_metanet_config_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown MetaNetConfig fields: \['colour'\]"):
        MetaNetConfig.from_dict({"colour": "red"})


def test_train_config_round_trips_through_its_json(tiny_config):
    cfg = TrainConfig(model=tiny_config, episodes=6, betas=(0.8, 0.9))
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_train_config_defaults_follow_the_authors_recipe():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.betas, cfg.grad_clip) == (1e-3, (0.9, 0.999), 10.0)
    assert cfg.model == MetaNetConfig() and cfg.model.n_chunks == 5


def test_train_config_names_its_characters_split_and_the_1200_preset_trains_as_the_paper():
    from model.config import PRESETS

    assert TrainConfig().split == "background"
    with pytest.raises(ValueError, match="split must be one of background, 1200, got"):
        TrainConfig(split="evaluation")
    paper, on_1200 = PRESETS["paper"], PRESETS["paper-1200"]
    assert on_1200.split == "1200"
    assert (on_1200.augment_prob, on_1200.augment_episode_pen, on_1200.uneven_prob) == (0.0, 0.0, 0.0)
    assert (on_1200.lr, on_1200.lr_patience, on_1200.model) == (paper.lr, paper.lr_patience, paper.model)
