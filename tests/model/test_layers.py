"""White-box tests of model/layers.py: augmented conv stacks, gradient preprocessing, meta learners."""

from __future__ import annotations

import math

import pytest
import torch

from model.layers import (
    CoordinateLSTM,
    CoordinateMLP,
    conv_trunk,
    conv_trunk_per_sample,
    pool,
    preprocess_grad,
)

C = 8


def kernels(seed: int, n: int | None = None) -> list[torch.Tensor]:
    """Five 3x3 conv kernels of width C (the first from one input channel), optionally per image."""
    g = torch.Generator().manual_seed(seed)
    lead = () if n is None else (n,)
    shapes = [(C, 1, 3, 3)] + [(C, C, 3, 3)] * 4
    return [torch.randn(*lead, *s, generator=g) * math.sqrt(2.0 / (s[1] * 9)) for s in shapes]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_pool_rounds_up_so_seven_becomes_four():
    assert pool(torch.ones(1, 1, 7, 7)).shape == (1, 1, 4, 4)


def test_conv_trunk_shrinks_28x28_images_to_one_feature_vector_per_image():
    assert conv_trunk(images(3), kernels(0), kernels(1)).shape == (3, C)


def test_conv_trunk_with_zero_fast_kernels_equals_the_slow_network_alone():
    x, slow = images(3), kernels(0)
    zeros = [torch.zeros_like(k) for k in slow]
    torch.testing.assert_close(conv_trunk(x, slow, zeros), conv_trunk(x, slow, None), rtol=0, atol=0)


def test_conv_trunk_adds_a_separately_rectified_fast_branch():
    # Layer augmentation: relu(S*h) + relu(F*h), not relu((S + F)*h).
    x, slow, fast = images(2), kernels(0), kernels(1)
    summed = [s + f for s, f in zip(slow, fast, strict=True)]
    assert not torch.allclose(conv_trunk(x, slow, fast), conv_trunk(x, summed, None), atol=1e-4)


def test_conv_trunk_per_sample_equals_conv_trunk_image_by_image_with_its_own_fast_kernels():
    n = 4
    x, slow, fast = images(n), kernels(0), kernels(1, n=n)
    batched = conv_trunk_per_sample(x, slow, fast)
    one_by_one = torch.cat([conv_trunk(x[i : i + 1], slow, [f[i] for f in fast]) for i in range(n)])
    assert batched.shape == (n, C)
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("g", "expected"),
    [
        (0.0, [-1.0, 0.0]),  # log(1e-20)/7 is far below -1: clamped
        (1e-5, [-1.0, 1e-5 * math.exp(7)]),  # tiny: the second coordinate carries the value
        (-1e-5, [-1.0, -1e-5 * math.exp(7)]),
        (0.01, [math.log(0.01) / 7, 1.0]),
        (1e4, [math.log(1e4) / 7, 1.0]),  # large: log|g|/p and the sign
        (-1e4, [math.log(1e4) / 7, -1.0]),
    ],
)
def test_preprocess_grad_matches_golden_values(g, expected):
    out = preprocess_grad(torch.tensor([g]), p=7.0)
    torch.testing.assert_close(out, torch.tensor([expected]), rtol=1e-5, atol=1e-6)


def test_preprocess_grad_turns_every_scalar_into_a_pair():
    assert preprocess_grad(torch.zeros(3, 5), p=7.0).shape == (3, 5, 2)


def test_coordinate_mlp_maps_each_coordinate_on_its_own():
    torch.manual_seed(0)
    m = CoordinateMLP(hidden=20)
    feats = torch.randn(3, 5, 2)
    out = m(feats)
    assert out.shape == (3, 5)
    torch.testing.assert_close(m(feats[1:2, 3:4]), out[1:2, 3:4])


def test_coordinate_lstm_maps_a_gradient_sequence_to_one_value_per_coordinate():
    torch.manual_seed(0)
    d = CoordinateLSTM(hidden=20)
    seq = torch.randn(5, 7, 2)  # (T, n_coords, 2)
    out = d(seq)
    assert out.shape == (7,)
    torch.testing.assert_close(d(seq[:, 2:4]), out[2:4], rtol=1e-5, atol=1e-6)  # coordinates independent
    assert not torch.allclose(d(seq[:1]), out)  # the whole sequence counts, not the last gradient only
