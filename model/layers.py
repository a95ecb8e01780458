"""Functional pieces of MetaNet: layer-augmented conv stacks, the meta learners' gradient
preprocessing, and the per-coordinate meta learners `m` (MLP) and `d` (LSTM).

Layer augmentation (paper section 3.3, authors' code): a hidden layer with slow weights S and fast
weights F computes relu(S * h) + relu(F * h); a linear output computes S h + F h. The fast branch uses
F alone, not S + F.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pool(h: Tensor) -> Tensor:
    """2x2 max-pooling, stride 2, ceil rounding: 28 -> 14 -> 7 -> 4 -> 2 -> 1 (floor would collapse
    7 -> 3 -> 1 -> 0).

    Without autograd it is two elementwise maxima, of the even and odd rows and then of the even
    and odd columns, an odd edge padded with -inf (so a window at the edge holds only real pixels,
    as with ceil rounding): the same values as `F.max_pool2d`, which on a CPU also writes an int64
    argmax per output for a backward that inference never runs (`python bench/forward.py` times
    both at the trunk's sizes). With
    autograd it is `F.max_pool2d`, whose backward sends a window's gradient to one argmax, and so
    it is in an ONNX export, where onnxruntime's MaxPool computes no indices.
    """
    if h.requires_grad or torch.onnx.is_in_onnx_export():
        return F.max_pool2d(h, 2, ceil_mode=True)
    height, width = h.shape[-2], h.shape[-1]
    if height % 2 or width % 2:
        h = F.pad(h, (0, width % 2, 0, height % 2), value=float("-inf"))
    rows = torch.maximum(h[..., 0::2, :], h[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _relu(t: Tensor) -> Tensor:
    """relu, in place where nothing needs t afterwards: t is a fresh op result and either no
    gradient flows (inference) or its op's backward does not read it (conv, matmul)."""
    return F.relu(t, inplace=True)


def conv_trunk(x: Tensor, slow: Sequence[Tensor], fast: Sequence[Tensor] | None) -> Tensor:
    """Five augmented conv blocks with one set of fast weights shared by the whole batch.

    The slow and fast kernels of a layer run as one convolution with 2*C_out output channels
    (both branches read the same input), then relu(slow) + relu(fast).

    Args:
        x: images of shape (n, 1, 28, 28).
        slow: conv kernels, the first (C, 1, 3, 3), the rest (C, C, 3, 3).
        fast: kernels of the same shapes, or None for the slow network alone.
    Returns:
        features of shape (n, C).
    """
    h = x
    for i, w in enumerate(slow):
        if fast is None:
            out = _relu(F.conv2d(h, w, padding=1))
        else:
            both = _relu(F.conv2d(h, torch.cat([w, fast[i]]), padding=1))
            out = both[:, : w.shape[0]] + both[:, w.shape[0] :]
        h = pool(out)
    return h.flatten(1)


def conv3x3_columns(h: Tensor) -> Tensor:
    """im2col for a 3x3 kernel with padding 1: (n, C, H, W) -> (n, C * 9, H * W).

    Column c * 9 + 3 * i + j holds channel c shifted by (i - 1, j - 1), the order of a kernel
    (C_out, C, 3, 3) flattened. Built from pads and slices only, so it exports to ONNX as is
    (ONNX's Conv takes a static `group`, which cannot express one kernel per image).
    """
    n, c, height, width = h.shape
    padded = F.pad(h, (1, 1, 1, 1))
    shifts = [padded[:, :, i : i + height, j : j + width] for i in range(3) for j in range(3)]
    return torch.stack(shifts, dim=2).reshape(n, c * 9, height * width)


def per_sample_conv3x3(h: Tensor, w: Tensor) -> Tensor:
    """Each image convolved with a 3x3 kernel of its own, padding 1: h (n, C_in, H, W) and w
    (n, C_out, C_in, 3, 3) -> (n, C_out, H * W).

    Two ways to the same values: `grouped_conv3x3` and `columns_conv3x3`. On a CPU without
    autograd the grouped one is the faster where the maps have several channels and are 7x7 or
    larger (oneDNN's grouped kernel), and for a single image (a plain convolution); the columns are
    the faster on the first layer's one channel and on the 4x4 and 2x2 maps (one thread:
    docs/performance.md, "b's per-image convolutions"). Autograd, an ONNX export (whose Conv fixes
    `group` in the graph) and other devices take the columns.
    """
    return grouped_conv3x3(h, w) if takes_grouped(h, w) else columns_conv3x3(h, w)


def takes_grouped(h: Tensor, w: Tensor) -> bool:
    """Whether `per_sample_conv3x3` runs h and w as a grouped convolution."""
    n, c_in, height, width = h.shape
    return (h.device.type == "cpu" and not (h.requires_grad or w.requires_grad)
            and not torch.onnx.is_in_onnx_export() and (n == 1 or (c_in > 1 and height * width >= 49)))


def grouped_conv3x3(h: Tensor, w: Tensor) -> Tensor:
    """`per_sample_conv3x3` as one grouped convolution: the batch folded into the channels, one
    group per image. w becomes (n * C_out, C_in, 3, 3): a view when each image's kernel is
    contiguous and the images' kernels follow one another (`MetaNet.classify_many` writes W* so),
    else a copy."""
    n, c_in, height, width = h.shape
    c_out = w.shape[1]
    out = F.conv2d(h.reshape(1, n * c_in, height, width), w.reshape(n * c_out, c_in, 3, 3),
                   padding=1, groups=n)
    return out.view(n, c_out, height * width)


def columns_conv3x3(h: Tensor, w: Tensor) -> Tensor:
    """`per_sample_conv3x3` as one batched matmul: each image's kernel times its im2col columns."""
    n, c_out = w.shape[:2]
    return torch.bmm(w.reshape(n, c_out, -1), conv3x3_columns(h))


def conv_trunk_per_sample(x: Tensor, slow: Sequence[Tensor], fast: Sequence[Tensor]) -> Tensor:
    """Like `conv_trunk`, but every image has fast kernels of its own.

    Per layer the slow branch is one convolution over the batch (its kernel is shared) and the
    fast branch one per-image convolution (`per_sample_conv3x3`), its kernels read in place where
    their layout allows. (Stacking [S; F_i] per image into one matmul copied the kernels, S n times
    over, at every call; `python bench/forward.py` times both.)

    Args:
        x: images of shape (n, 1, 28, 28).
        fast: per-image kernels, each of shape (n, C_out, C_in, 3, 3).
    Returns:
        features of shape (n, C).
    """
    h = x
    for w_slow, w_fast in zip(slow, fast, strict=True):
        slow_out = _relu(F.conv2d(h, w_slow, padding=1))  # (n, C_out, H, W)
        fast_out = _relu(per_sample_conv3x3(h, w_fast))  # (n, C_out, H * W)
        h = pool(slow_out + fast_out.view_as(slow_out))
    return h.flatten(1)


def conv_trunk_per_task(x: Tensor, slow: Sequence[Tensor], fast: Sequence[Tensor]) -> Tensor:
    """Like `conv_trunk`, for several tasks at once, each with fast kernels of its own shared by its
    images (meta-training's batched episodes: each episode's Q*).

    The tasks fold into the channels: image j of every task is one stack of maps (B * C, H, W), and
    each layer is one grouped convolution with a group per task whose kernel is [S; F_b] (both
    branches read the same input, as in `conv_trunk`). No per-image copy of the kernels is made, as
    `conv_trunk_per_sample` would need; with one task it is `conv_trunk`'s convolution.

    Args:
        x: images of shape (B, n, 1, 28, 28), n of each of B tasks.
        slow: conv kernels, shared by every task.
        fast: each task's kernels, each of shape (B, *slow[i].shape).
    Returns:
        features of shape (B, n, C).
    """
    n_tasks, n = x.shape[:2]
    h = x.transpose(0, 1).reshape(n, n_tasks * x.shape[2], *x.shape[-2:])  # (n, B * C_in, H, W)
    for w_slow, w_fast in zip(slow, fast, strict=True):
        c_out = w_slow.shape[0]
        kernels = torch.cat([w_slow.expand(n_tasks, *w_slow.shape), w_fast], dim=1)  # (B, 2 C_out, ...)
        both = _relu(F.conv2d(h, kernels.reshape(-1, *w_slow.shape[1:]), padding=1, groups=n_tasks))
        both = both.view(n, n_tasks, 2, c_out, *both.shape[-2:])  # each task's [slow; fast] outputs
        h = pool((both[:, :, 0] + both[:, :, 1]).flatten(1, 2))
    return h.view(n, n_tasks, -1).transpose(0, 1)


def preprocess_grad(g: Tensor, p: float) -> Tensor:
    """Andrychowicz et al. (2016) preprocessing: each scalar becomes a 2-vector.

    [max(log(|g| + eps) / p, -1), clip(exp(p) g, -1, 1)]; the first coordinate carries the scale,
    the second the sign (and the value when it is tiny). Shape (...,) -> (..., 2).
    """
    scale = (torch.log(g.abs() + 1e-20) / p).clamp(min=-1.0)
    sign = (g * math.exp(p)).clamp(-1.0, 1.0)
    return torch.stack([scale, sign], dim=-1)


# Coordinates a meta learner takes at a time when no gradient flows (registration) and in training's
# backward on a CPU: its hidden activations for them, (rows, 20) floats, stay in a core's cache.
# Over all of a task's coordinates at once they went to memory and back between layers
# (`python bench/meta_learners.py`).
COORDINATE_ROWS = 8192


def _needs_autograd(module: nn.Module, x: Tensor) -> bool:
    return x.requires_grad or (torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))


def _by_blocks_on_cpu(module: nn.Module, x: Tensor) -> bool:
    """Train a meta learner by `_GradientsByBlock`: on a CPU, where the activations of a whole
    episode's coordinates go to memory and back (a block at a time, `m`'s forward and backward
    took 0.31 to 0.34 of their time and `d`'s 0.40 to 0.55, and an episode 0.46 to 0.61:
    docs/performance.md), and only for inputs that are constants, as the meta information is
    (first order: no gradient flows to it)."""
    return x.device.type == "cpu" and not x.requires_grad and torch.is_grad_enabled() and any(
        p.requires_grad for p in module.parameters())


class _GradientsByBlock(torch.autograd.Function):
    """A meta learner over constant inputs: the forward runs its no-autograd path; the backward
    recomputes it `COORDINATE_ROWS` coordinates at a time with autograd and sums each block's
    parameter gradients, so no activation of the whole episode is ever stored. The same gradients
    as autograd over everything at once, to float rounding (tests/model/test_layers.py)."""

    @staticmethod
    def forward(ctx, learner: nn.Module, features: Tensor, *params: Tensor) -> Tensor:  # noqa: ANN001
        ctx.learner = learner
        ctx.save_for_backward(features)
        return learner(features)  # no grad mode here: the fast path

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        (features,) = ctx.saved_tensors
        learner = ctx.learner
        params = tuple(learner.parameters())
        totals = [torch.zeros_like(p) for p in params]
        for block, grad_block in learner.blocks(features, grad_out):
            with torch.enable_grad():
                out = learner.differentiable(block)
            for total, grad in zip(totals, torch.autograd.grad(out, params, grad_block), strict=True):
                total += grad
        return (None, None, *totals)


class CoordinateMLP(nn.Module):
    """Meta learner `m`: the same 2 -> 20 -> 20 -> 1 ReLU MLP applied to every gradient coordinate.

    Without autograd (registration) it runs `COORDINATE_ROWS` coordinates at a time, each layer one
    addmm with the ReLU in place: the same values as `net`, which training runs on a GPU (on a
    CPU, a block at a time: `_GradientsByBlock`)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, grad_features: Tensor) -> Tensor:
        """(..., 2) preprocessed gradients -> (...) fast weights."""
        if _by_blocks_on_cpu(self, grad_features):
            return _GradientsByBlock.apply(self, grad_features, *self.parameters())
        if _needs_autograd(self, grad_features):
            return self.net(grad_features).squeeze(-1)
        first, _, second, _, last = self.net
        rows = grad_features.reshape(-1, 2)
        out = torch.empty(len(rows), 1, dtype=rows.dtype, device=rows.device)
        for start in range(0, len(rows), COORDINATE_ROWS):
            block = slice(start, start + COORDINATE_ROWS)
            h = torch.addmm(first.bias, rows[block], first.weight.T).relu_()
            h = torch.addmm(second.bias, h, second.weight.T).relu_()
            torch.addmm(last.bias, h, last.weight.T, out=out[block])
        return out.view(grad_features.shape[:-1])

    def blocks(self, grad_features: Tensor, grad_out: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(coordinates, their output's gradient) a block at a time, for `_GradientsByBlock`."""
        rows, grads = grad_features.reshape(-1, 2), grad_out.reshape(-1)
        return [(rows[i : i + COORDINATE_ROWS], grads[i : i + COORDINATE_ROWS])
                for i in range(0, len(rows), COORDINATE_ROWS)]

    def differentiable(self, rows: Tensor) -> Tensor:
        return self.net(rows).squeeze(-1)


class CoordinateLSTM(nn.Module):
    """Meta learner `d`: an LSTM(2 -> 20) + Linear(20 -> 1) run per coordinate over T gradients.

    Its state starts at zero for every task; the output after the last gradient is Q*. Without
    autograd (registration) it runs `COORDINATE_ROWS` coordinates at a time through the LSTM's
    equations written out (one addmm pair for the four gates a step): the same values as
    `nn.LSTM`, which training runs on a GPU, to float rounding, at about a third of its time here
    (training on a CPU runs these equations by blocks: `differentiable`, `_GradientsByBlock`)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, grad_features: Tensor) -> Tensor:
        """(T, n_coords, 2) preprocessed gradient sequence -> (n_coords,) fast weights."""
        if _by_blocks_on_cpu(self, grad_features):
            return _GradientsByBlock.apply(self, grad_features, *self.parameters())
        if _needs_autograd(self, grad_features):
            # On a GPU, PyTorch's own LSTM kernels, not cuDNN's: over the 1.2 million coordinates of
            # 8 episodes (5 steps, hidden 20) cuDNN's forward and backward took 102 ms on an H200,
            # PyTorch's 12.5 (a scratch timing); the training mix at 8 episodes a step went from 29
            # to 40 episodes/s (bench/results/train-throughput-2026-12-04-nvidia-h200*.json).
            with torch.backends.cudnn.flags(enabled=False) if grad_features.is_cuda else nullcontext():
                _, (h_last, _) = self.lstm(grad_features)
            return self.out(h_last[-1]).squeeze(-1)
        lstm = self.lstm
        w_in, w_hidden = lstm.weight_ih_l0.T, lstm.weight_hh_l0.T
        bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
        steps, n_coords, _ = grad_features.shape
        out = torch.empty(n_coords, 1, dtype=grad_features.dtype, device=grad_features.device)
        for start in range(0, n_coords, COORDINATE_ROWS):
            block = slice(start, start + COORDINATE_ROWS)
            x = grad_features[:, block]
            h = x.new_zeros(x.shape[1], lstm.hidden_size)
            c = torch.zeros_like(h)
            for t in range(steps):
                gates = torch.addmm(bias, x[t], w_in).addmm_(h, w_hidden)
                i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTM's order: input, forget, cell, output
                c = torch.sigmoid(f).mul_(c).addcmul_(torch.sigmoid(i), torch.tanh(g))
                h = torch.sigmoid(o).mul_(torch.tanh(c))
            torch.addmm(self.out.bias, h, self.out.weight.T, out=out[block])
        return out.view(n_coords)

    def blocks(self, grad_features: Tensor, grad_out: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(coordinates' sequences, their output's gradient) a block at a time."""
        return [(grad_features[:, i : i + COORDINATE_ROWS], grad_out[i : i + COORDINATE_ROWS])
                for i in range(0, grad_features.shape[1], COORDINATE_ROWS)]

    def differentiable(self, x: Tensor) -> Tensor:
        """The equations of the no-autograd path, out of place (autograd keeps what they overwrite):
        (T, rows, 2) -> (rows,)."""
        lstm = self.lstm
        w_in, w_hidden = lstm.weight_ih_l0.T, lstm.weight_hh_l0.T
        bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
        h = x.new_zeros(x.shape[1], lstm.hidden_size)
        c = torch.zeros_like(h)
        for t in range(len(x)):
            i, f, g, o = torch.addmm(bias, x[t], w_in).addmm(h, w_hidden).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return torch.addmm(self.out.bias, h, self.out.weight.T).squeeze(1)
