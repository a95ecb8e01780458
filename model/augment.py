"""Training-only augmentation: drawings varied as users' images vary, before the canonical framing.

`Augment` changes a share of the drawings of an episode, each on its own, at the source resolution
(Omniglot's 105x105) and then frames every drawing with `model.transform.frame`, so the networks
learn what the framing cannot undo:

- the pen: strokes eroded by one pixel or dilated by up to `pen_max` pixels (thin to thick pens),
  each drawing with its own, or, in a share `episode_pen` of the episodes, every drawing of the
  episode with the same one: a user draws a whole support set and its queries with one pen, and
  a thick pen makes glyphs harder to tell from each other, not only from thin-pen drawings;
- a small turn (up to `rotate` degrees) and a shift of a few pixels (where strokes fall on the
  pixel grid);
- the resolution: with probability `low_res`, the drawing's frame is first shrunk to one of
  `sizes` pixels a side, as a glyph drawn small in its image, or an image sent at 28x28 or less,
  reaches the framing with fewer pixels than Omniglot's.

Scale and position as such need no augmenting: the framing removes them (a glyph drawn small and
off-centre frames as the same glyph, at a lower resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.transform import frame


@dataclass(frozen=True)
class Augment:
    prob: float = 0.0  # the share of drawings augmented; the rest are framed as they are
    rotate: float = 15.0  # degrees, either way
    shift: float = 4.0  # source pixels, on each axis
    pen_max: int = 3  # the widest dilation, in source pixels; -1 (erosion) is the thinnest pen
    low_res: float = 0.4  # of the augmented drawings, the share first shrunk to one of `sizes`
    episode_pen: float = 0.0  # the share of episodes drawn with one pen throughout (not the plain one)
    sizes: tuple[int, ...] = (28, 20, 14, 10)

    def __post_init__(self) -> None:
        for name in ("prob", "low_res", "episode_pen"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"augment {name} is a probability, got {value!r}")
        for name in ("rotate", "shift"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"augment {name} must be a finite number, 0 or more, got {value!r}")
        if self.pen_max < 0:
            raise ValueError(f"augment pen_max must be 0 or more, got {self.pen_max!r}")
        if not self.sizes or min(self.sizes) < 4:
            raise ValueError(f"augment sizes must be frame sides of 4 pixels or more, got {self.sizes!r}")

    @property
    def active(self) -> bool:
        return self.prob > 0 or self.episode_pen > 0

    def __call__(self, ink: Tensor, rng: np.random.Generator, size: int) -> Tensor:
        """Source drawings (n, H, W), ink = 1 on 0 -> framed model inputs (n, size, size)."""
        n = len(ink)
        ink = ink.float()
        # (No draw at all without episode pens: a run without them keeps its random stream.)
        one_pen = self.episode_pen > 0 and rng.random() < self.episode_pen
        if one_pen:
            pen = int(rng.choice([p for p in range(-1, self.pen_max + 1) if p != 0]))
            ink = _pen(ink[:, None], np.full(n, pen))[:, 0]
        chosen = np.flatnonzero(rng.random(n) < self.prob)
        pens = rng.integers(-1, self.pen_max + 1, len(chosen))
        if one_pen:
            pens[:] = 0  # every drawing has the episode's pen already
        angles = np.deg2rad(rng.uniform(-self.rotate, self.rotate, len(chosen)))
        shifts = rng.uniform(-self.shift, self.shift, (len(chosen), 2))
        sides = np.where(rng.random(len(chosen)) < self.low_res, rng.choice(self.sizes, len(chosen)), 0)
        if len(chosen) == 0:
            return frame(ink, size)
        changed = ink[torch.as_tensor(chosen, device=ink.device)][:, None]
        changed = _pen(changed, pens)
        changed = _turn_and_shift(changed, angles, shifts)[:, 0]
        out = frame(ink, size)
        for side in np.unique(sides):
            group = np.flatnonzero(sides == side)
            x = changed[torch.as_tensor(group, device=ink.device)]
            if side:
                x = F.adaptive_avg_pool2d(x[:, None], int(side))[:, 0]
            out[torch.as_tensor(chosen[group], device=ink.device)] = frame(x, size)
        return out


def _pen(x: Tensor, pens: np.ndarray) -> Tensor:
    """Each drawing (n, 1, H, W) with its pen: -1 erodes strokes by a pixel (a 3x3 minimum), r > 0
    dilates them by r pixels (a (2r+1)^2 maximum), 0 leaves them."""
    out = x.clone()
    for radius in np.unique(pens):
        if radius == 0:
            continue
        rows = torch.as_tensor(np.flatnonzero(pens == radius), device=x.device)
        if radius < 0:
            out[rows] = -F.max_pool2d(-x[rows], 3, stride=1, padding=1)
        else:
            out[rows] = dilate(x[rows], int(radius))
    return out


def dilate(x: Tensor, radius: int) -> Tensor:
    """Strokes of drawings (n, 1, H, W) widened by `radius` pixels each side (a square pen)."""
    return F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)


def _turn_and_shift(x: Tensor, angles: np.ndarray, shifts: np.ndarray) -> Tensor:
    """Each drawing (n, 1, H, W) turned about its centre and shifted (source pixels), bilinearly."""
    n, _, height, width = x.shape
    cos, sin = np.cos(angles), np.sin(angles)
    # affine_grid maps output to input coordinates in [-1, 1]: one pixel is 2 / side of them.
    tx, ty = shifts[:, 0] * 2 / width, shifts[:, 1] * 2 / height
    theta = np.stack([np.stack([cos, -sin, tx], 1), np.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(torch.as_tensor(theta, dtype=x.dtype, device=x.device), [n, 1, height, width],
                         align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
