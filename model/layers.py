"""Functional pieces of MetaNet: layer-augmented conv stacks, the meta learners' gradient
preprocessing, and the per-coordinate meta learners `m` (MLP) and `d` (LSTM).

Layer augmentation (paper section 3.3, authors' code): a hidden layer with slow weights S and fast
weights F computes relu(S * h) + relu(F * h); a linear output computes S h + F h. The fast branch uses
F alone, not S + F.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pool(h: Tensor) -> Tensor:
    # ceil rounding keeps 28 -> 14 -> 7 -> 4 -> 2 -> 1; floor would collapse 7 -> 3 -> 1 -> 0.
    return F.max_pool2d(h, 2, ceil_mode=True)


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
            out = F.relu(F.conv2d(h, w, padding=1))
        else:
            both = F.relu(F.conv2d(h, torch.cat([w, fast[i]]), padding=1))
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


def conv_trunk_per_sample(x: Tensor, slow: Sequence[Tensor], fast: Sequence[Tensor]) -> Tensor:
    """Like `conv_trunk`, but every image has fast kernels of its own.

    Each layer is one batched matmul: image i's columns (im2col) times its kernel [S; F_i], so the
    slow and fast branches of all images run in a single kernel launch whatever the batch size.

    Args:
        x: images of shape (n, 1, 28, 28).
        fast: per-image kernels, each of shape (n, C_out, C_in, 3, 3).
    Returns:
        features of shape (n, C).
    """
    n = x.shape[0]
    h = x
    for w_slow, w_fast in zip(slow, fast, strict=True):
        c_out, height, width = w_slow.shape[0], h.shape[2], h.shape[3]
        kernels = torch.cat(
            [w_slow.reshape(1, c_out, -1).expand(n, -1, -1), w_fast.reshape(n, c_out, -1)], dim=1
        )  # (n, 2C_out, C_in * 9)
        both = F.relu(torch.bmm(kernels, conv3x3_columns(h)))  # (n, 2C_out, H * W)
        out = both[:, :c_out] + both[:, c_out:]
        h = pool(out.reshape(n, c_out, height, width))
    return h.flatten(1)


def preprocess_grad(g: Tensor, p: float) -> Tensor:
    """Andrychowicz et al. (2016) preprocessing: each scalar becomes a 2-vector.

    [max(log(|g| + eps) / p, -1), clip(exp(p) g, -1, 1)]; the first coordinate carries the scale,
    the second the sign (and the value when it is tiny). Shape (...,) -> (..., 2).
    """
    scale = (torch.log(g.abs() + 1e-20) / p).clamp(min=-1.0)
    sign = (g * math.exp(p)).clamp(-1.0, 1.0)
    return torch.stack([scale, sign], dim=-1)


class CoordinateMLP(nn.Module):
    """Meta learner `m`: the same 2 -> 20 -> 20 -> 1 ReLU MLP applied to every gradient coordinate."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, grad_features: Tensor) -> Tensor:
        """(..., 2) preprocessed gradients -> (...) fast weights."""
        return self.net(grad_features).squeeze(-1)


class CoordinateLSTM(nn.Module):
    """Meta learner `d`: an LSTM(2 -> 20) + Linear(20 -> 1) run per coordinate over T gradients.

    Its state starts at zero for every task; the output after the last gradient is Q*.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, grad_features: Tensor) -> Tensor:
        """(T, n_coords, 2) preprocessed gradient sequence -> (n_coords,) fast weights."""
        _, (h_last, _) = self.lstm(grad_features)
        return self.out(h_last[-1]).squeeze(-1)
