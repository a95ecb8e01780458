"""White-box tests of model/layers.py: augmented conv stacks, gradient preprocessing, meta learners."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.layers import (
    COORDINATE_ROWS,
    CoordinateLSTM,
    CoordinateMLP,
    conv_trunk,
    conv_trunk_per_sample,
    per_sample_conv3x3,
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


@pytest.mark.parametrize("side", [28, 14, 7, 4, 2, 1, 5])
def test_pool_without_autograd_gives_max_pool2d_s_values_exactly(side):
    # The four-quarters pooling (no argmax indices) against F.max_pool2d with ceil rounding, on
    # signed values (an odd edge must not let padding win a window), ties and infinities.
    g = torch.Generator().manual_seed(side)
    h = torch.randn(3, 4, side, side + 1, generator=g).round(decimals=1)
    h[0, 0, 0, 0], h[1, 1, -1, -1] = -math.inf, math.inf
    with torch.inference_mode():
        got = pool(h)
    torch.testing.assert_close(got, torch.nn.functional.max_pool2d(h, 2, ceil_mode=True), rtol=0, atol=0)


def test_pool_with_autograd_sends_each_window_s_gradient_to_one_argmax():
    h = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]], requires_grad=True)  # a tie in the window
    pool(h).sum().backward()
    assert h.grad is not None and h.grad.sum().item() == 1.0 and h.grad.max().item() == 1.0


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


def test_conv_trunk_per_sample_reads_kernels_in_place_from_rows_of_flat_fast_weights():
    # The service's W*: every image's kernels are slices of one (n, P) row, so the per-layer
    # tensors are views with a row stride, not contiguous copies.
    n = 3
    x, slow, fast = images(n), kernels(0), kernels(1, n=n)
    flat = torch.cat([f.reshape(n, -1) for f in fast] + [torch.zeros(n, 5)], dim=1)
    views, start = [], 0
    for f in fast:
        size = f[0].numel()
        views.append(flat[:, start : start + size].reshape(f.shape))
        start += size
    assert not views[1].is_contiguous()
    with torch.inference_mode():
        in_place, copied = conv_trunk_per_sample(x, slow, views), conv_trunk_per_sample(x, slow, fast)
    torch.testing.assert_close(in_place, copied, rtol=0, atol=0)


def test_conv_trunk_per_sample_trains_as_it_infers():
    # With autograd (training) the same values, to float rounding (training multiplies im2col
    # columns, inference runs most layers as grouped convolutions), and gradients reach every
    # image's fast kernels.
    n = 2
    x, slow = images(n), kernels(0)
    fast = [k.requires_grad_() for k in kernels(1, n=n)]
    out = conv_trunk_per_sample(x, slow, fast)
    with torch.inference_mode():
        torch.testing.assert_close(out.detach(), conv_trunk_per_sample(x, slow, [f.detach() for f in fast]),
                                   rtol=1e-5, atol=1e-5)
    out.sum().backward()
    for f in fast:  # every layer's kernels, for each image
        assert f.grad is not None and bool(f.grad.abs().flatten(1).sum(1).gt(0).all())


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


def gradient_features(*shape: int, seed: int = 0) -> torch.Tensor:
    """Preprocessed gradients as registration hands them over: scales from 1e-9 to 1, both signs."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(*shape, generator=g) * 10 ** (-9 * torch.rand(*shape, generator=g))
    return preprocess_grad(raw, 7.0)


def _not_called(*args: object) -> None:
    raise AssertionError("the inference path should not call this")


# Over two blocks and a part of a third; (n, P, 2) as `m` gets it, and a column slice of it.
MLP_INPUTS = [(3, 2 * COORDINATE_ROWS + 123), (1, 5)]


@pytest.mark.parametrize("shape", MLP_INPUTS)
def test_coordinate_mlp_without_autograd_gives_the_values_of_its_layers(shape, monkeypatch):
    torch.manual_seed(0)
    m = CoordinateMLP(hidden=20)
    feats = gradient_features(*shape)
    expected = m.net(feats).squeeze(-1)  # the layers as training runs them
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(m.net, "forward", _not_called)  # the blocks' own addmms, not the Sequential
        fast = m(feats)
        sliced = m(feats[:, 1:])  # not contiguous
    assert fast.shape == shape
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sliced, expected[:, 1:], rtol=1e-6, atol=1e-6)
    assert m(feats).requires_grad  # with autograd: the layers themselves, differentiable in Z


@pytest.mark.parametrize("steps, n_coords", [(5, 2 * COORDINATE_ROWS + 77), (1, 3)])
def test_coordinate_lstm_without_autograd_gives_nn_lstm_s_values(steps, n_coords, monkeypatch):
    torch.manual_seed(0)
    d = CoordinateLSTM(hidden=20)
    seq = gradient_features(steps, n_coords + 1)[:, 1:]  # a column slice, as `d` gets its parts
    _, (h_last, _) = d.lstm(seq)
    expected = d.out(h_last[-1]).squeeze(-1)  # nn.LSTM, as training runs it
    with torch.inference_mode(), monkeypatch.context() as patch:
        patch.setattr(d.lstm, "forward", _not_called)  # the equations written out, not nn.LSTM
        fast = d(seq)
    assert fast.shape == (n_coords,)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
    out = d(seq)
    assert out.requires_grad
    out.sum().backward()
    assert d.lstm.weight_hh_l0.grad is not None  # training still reaches G


def _layers(module: CoordinateMLP | CoordinateLSTM, feats: torch.Tensor) -> torch.Tensor:
    """The learner's layers under autograd over every coordinate at once."""
    if isinstance(module, CoordinateMLP):
        return module.net(feats).squeeze(-1)
    _, (h_last, _) = module.lstm(feats)
    return module.out(h_last[-1]).squeeze(-1)


@pytest.mark.parametrize("learner", ["m", "d"])
def test_training_on_a_cpu_runs_by_blocks_with_the_gradients_of_autograd_over_everything(learner):
    torch.manual_seed(0)
    # Two blocks and part of a third, a column slice as the learners get their parts.
    if learner == "m":
        module: CoordinateMLP | CoordinateLSTM = CoordinateMLP(hidden=20)
        feats = gradient_features(3, 2 * COORDINATE_ROWS + 124)[:, 1:]
    else:
        module = CoordinateLSTM(hidden=20)
        feats = gradient_features(5, 2 * COORDINATE_ROWS + 78)[:, 1:]
    params = list(module.parameters())
    expected_out = _layers(module, feats)
    upstream = torch.randn(expected_out.shape, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(expected_out, params, upstream)
    out = module(feats)
    assert type(out.grad_fn).__name__ == "_GradientsByBlockBackward"
    torch.testing.assert_close(out.detach(), expected_out.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(out, params, upstream), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_meta_learner_inputs_that_need_a_gradient_get_it_through_the_layers():
    torch.manual_seed(0)
    module = CoordinateMLP(hidden=20)
    feats = gradient_features(2, 10).requires_grad_()
    out = module(feats)
    assert type(out.grad_fn).__name__ != "_GradientsByBlockBackward"
    out.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


@pytest.mark.parametrize("n, c_in, size",
                         [(1, 1, 28), (1, 64, 4), (4, 1, 28), (4, 64, 14), (4, 64, 7), (4, 64, 2)])
def test_per_sample_conv3x3_grouped_and_matmul_ways_agree_with_conv2d_image_by_image(n, c_in, size):
    gen = torch.Generator().manual_seed(n * 1000 + c_in + size)
    h = torch.randn(n, c_in, size, size, generator=gen)
    w = torch.randn(n, C, c_in, 3, 3, generator=gen) * 0.1
    expected = torch.cat([F.conv2d(h[i : i + 1], w[i], padding=1) for i in range(n)]).flatten(2)
    with torch.inference_mode():
        fast = per_sample_conv3x3(h, w)  # grouped where that is faster
    matmul = per_sample_conv3x3(h, w.requires_grad_()).detach()  # autograd: always the matmul
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul, expected, rtol=1e-5, atol=1e-5)
