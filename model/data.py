"""Omniglot: loading (packed npz, PNG folders, the official zip files), preprocessing to the
model's 28x28 ink=1 input, the background/validation/evaluation split and the episode sampler.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATA_DIR_ENV = "METANET_OMNIGLOT_DIR"
SPLITS = ("background", "evaluation")


@dataclass(frozen=True)
class OmniglotSplit:
    """One Omniglot split: images of shape (n_chars, n_drawings, 28, 28), float32, ink = 1."""

    images: np.ndarray
    alphabet: np.ndarray  # (n_chars,) str
    character: np.ndarray  # (n_chars,) str

    def select_alphabets(self, names: set[str], keep: bool = True) -> OmniglotSplit:
        mask = np.isin(self.alphabet, sorted(names))
        mask = mask if keep else ~mask
        return OmniglotSplit(self.images[mask], self.alphabet[mask], self.character[mask])

    @property
    def alphabets(self) -> list[str]:
        return sorted(set(self.alphabet.tolist()))


def default_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """`data_dir`, else $METANET_OMNIGLOT_DIR; a clear error when neither is given."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        raise FileNotFoundError(f"no Omniglot directory: pass --data-dir or set {DATA_DIR_ENV}")
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"Omniglot directory {path} does not exist")
    return path


def to_model_input(ink: np.ndarray | Tensor, size: int = 28) -> Tensor:
    """Images of shape (..., H, W) with ink = 1 in [0, 1] -> float32 (..., size, size).

    Non-square images are padded with background to a centred square, then shrunk by area
    averaging (every source pixel counts, so thin strokes survive 105 -> 28).
    """
    x = torch.as_tensor(ink, dtype=torch.float32)
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, 1, h, w)
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top))
    if x.shape[-1] != size:
        x = F.adaptive_avg_pool2d(x, size)
    return x.reshape(*lead, size, size).clamp_(0.0, 1.0)


def load_split(data_dir: str | os.PathLike[str] | None, split: str, size: int = 28) -> OmniglotSplit:
    """Read one split from whichever layout `data_dir` holds, preprocessed to (size, size).

    Layouts, tried in order: `omniglot_{split}.npz` (packed bits, ink = 1);
    `images_{split}/<alphabet>/<character>/*.png`; the official `images_{split}.zip`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = default_data_dir(data_dir)
    npz, folder, archive = (
        root / f"omniglot_{split}.npz",
        root / f"images_{split}",
        root / f"images_{split}.zip",
    )
    if npz.is_file():
        return _load_npz(npz, size)
    if folder.is_dir():
        return _load_pngs(_folder_entries(folder), size)
    if archive.is_file():
        with zipfile.ZipFile(archive) as zf:
            return _load_pngs(_zip_entries(zf, f"images_{split}"), size)
    raise FileNotFoundError(f"no Omniglot {split} split in {root}: expected {npz.name}, "
                            f"{folder.name}/ or {archive.name}")


def _load_npz(path: Path, size: int) -> OmniglotSplit:
    with np.load(path, allow_pickle=False) as d:
        bits = np.unpackbits(d["images"], axis=-1)[..., : int(d["width"])]
        alphabet, character = d["alphabet"], d["character"]
    images = np.empty(bits.shape[:2] + (size, size), dtype=np.float32)
    for start in range(0, len(bits), 64):  # bounded float memory for the full split
        images[start : start + 64] = to_model_input(bits[start : start + 64], size).numpy()
    return OmniglotSplit(images, alphabet.astype(str), character.astype(str))


def _folder_entries(folder: Path) -> Iterator[tuple[str, str, list[bytes]]]:
    for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
        for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            files = sorted(character.glob("*.png"))
            yield alphabet.name, character.name, [f.read_bytes() for f in files]


def _zip_entries(zf: zipfile.ZipFile, top: str) -> Iterator[tuple[str, str, list[bytes]]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for name in zf.namelist():
        parts = name.split("/")
        if len(parts) == 4 and parts[0] == top and parts[3].endswith(".png"):
            groups.setdefault((parts[1], parts[2]), []).append(name)
    for (alphabet, character), names in sorted(groups.items()):
        yield alphabet, character, [zf.read(n) for n in sorted(names)]


def _load_pngs(entries: Iterator[tuple[str, str, list[bytes]]], size: int) -> OmniglotSplit:
    from PIL import Image  # only the PNG layouts need Pillow

    chars, alphabets, characters = [], [], []
    for alphabet, character, blobs in entries:
        if not blobs:
            continue
        drawings = []
        for blob in blobs:
            grey = np.asarray(Image.open(io.BytesIO(blob)).convert("L"), dtype=np.float32) / 255.0
            drawings.append(to_model_input(1.0 - grey, size).numpy())  # black strokes -> ink = 1
        chars.append(np.stack(drawings))
        alphabets.append(alphabet)
        characters.append(character)
    if not chars:
        raise FileNotFoundError("no PNG drawings found")
    n_draw = min(len(c) for c in chars)
    images = np.stack([c[:n_draw] for c in chars])
    return OmniglotSplit(images, np.array(alphabets), np.array(characters))


def train_val_split(
    background: OmniglotSplit, n_val_alphabets: int = 4
) -> tuple[OmniglotSplit, OmniglotSplit]:
    """Hold out every k-th background alphabet (sorted by name) for validation.

    The evaluation alphabets are never seen in training or model selection.
    """
    names = background.alphabets
    # Keep at least one alphabet to train on: with 4 or fewer alphabets (a small or test data set)
    # every alphabet used to be held out, leaving an empty training split.
    n_val = min(n_val_alphabets, len(names) - 1)
    step = max(1, len(names) // max(1, n_val))
    val = set(names[step - 1 :: step][:n_val]) if n_val > 0 else set()
    return background.select_alphabets(val, keep=False), background.select_alphabets(val)


@dataclass(frozen=True)
class Episode:
    support_x: Tensor  # (n_way * n_shot, 1, 28, 28)
    support_y: Tensor  # (n_way * n_shot,) class ids 0..n_way-1
    query_x: Tensor  # (n_way * n_query, 1, 28, 28)
    query_y: Tensor  # (n_way * n_query,)
    n_way: int


@dataclass(frozen=True)
class Jitter:
    """Training-only distortion of each drawing by its own small random affine map: a turn of up to
    `rotate` degrees, a zoom by a factor within 1 +- `scale` and a shift of up to `shift` pixels on
    each axis, each drawing with probability `prob` (the rest pass unchanged: resampling blurs a
    28x28 drawing a little, and queries in service are never resampled). Unlike the 90-degree
    turns, it keeps a drawing's class: it teaches the networks that a character drawn a little
    askew is the same character (the background set has only 964)."""

    shift: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0
    prob: float = 0.5

    def __post_init__(self) -> None:
        for name in ("shift", "rotate", "scale", "prob"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"jitter {name} must be a finite number, 0 or more, got {value!r}")
        if self.scale >= 1:
            raise ValueError(f"jitter scale must be below 1, got {self.scale!r}")
        if self.prob > 1:
            raise ValueError(f"jitter prob is a probability, got {self.prob!r}")

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.shift > 0 or self.rotate > 0 or self.scale > 0)

    def __call__(self, images: Tensor, rng: np.random.Generator) -> Tensor:
        """images (n, 1, h, w), ink = 1 on 0: each resampled bilinearly, empty margins at 0."""
        n, _, height, width = images.shape
        angle = np.deg2rad(rng.uniform(-self.rotate, self.rotate, n))
        zoom = rng.uniform(1 - self.scale, 1 + self.scale, n)
        # affine_grid maps output to input coordinates in [-1, 1]: one pixel is 2 / size of them.
        shift = rng.uniform(-self.shift, self.shift, (n, 2)) * (2 / width, 2 / height)
        keep = rng.random(n) >= self.prob
        angle[keep], zoom[keep], shift[keep] = 0.0, 1.0, 0.0
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        theta = np.stack([np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1)
        theta = torch.as_tensor(theta, dtype=images.dtype, device=images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.where(torch.as_tensor(keep, device=images.device)[:, None, None, None], images, moved)


class EpisodeSampler:
    """N-way K-shot episodes from a split; with `rotate`, each class is a character turned by a
    random multiple of 90 degrees (support and queries alike), which makes new classes; with an
    active `jitter`, every drawing is also distorted on its own (see Jitter)."""

    def __init__(self, split: OmniglotSplit, *, rotate: bool, device: torch.device | str = "cpu",
                 jitter: Jitter | None = None):
        self.images = torch.from_numpy(split.images)
        self.rotate = rotate
        self.jitter = jitter if jitter is not None and jitter.active else None
        self.device = torch.device(device)
        self.n_chars, self.n_drawings = self.images.shape[:2]

    def sample(self, rng: np.random.Generator, n_way: int, n_shot: int, n_query: int) -> Episode:
        self._check_episode_fits(n_way, n_shot, n_query)
        n_classes = self.n_chars * (4 if self.rotate else 1)
        classes = rng.choice(n_classes, size=n_way, replace=False)
        support, query = [], []
        for cls in classes:
            char, turns = divmod(int(cls), 4) if self.rotate else (int(cls), 0)
            drawings = rng.choice(self.n_drawings, size=n_shot + n_query, replace=False)
            x = self.images[char, torch.as_tensor(drawings)]
            if turns:
                x = torch.rot90(x, turns, dims=(-2, -1))
            support.append(x[:n_shot])
            query.append(x[n_shot:])
        labels = torch.arange(n_way)
        support_x = torch.cat(support).unsqueeze(1).to(self.device)
        query_x = torch.cat(query).unsqueeze(1).to(self.device)
        if self.jitter is not None:
            support_x, query_x = self.jitter(torch.cat([support_x, query_x]), rng).split(
                [len(support_x), len(query_x)]
            )
        return Episode(
            support_x=support_x,
            support_y=labels.repeat_interleave(n_shot).to(self.device),
            query_x=query_x,
            query_y=labels.repeat_interleave(n_query).to(self.device),
            n_way=n_way,
        )

    def _check_episode_fits(self, n_way: int, n_shot: int, n_query: int) -> None:
        n_classes = self.n_chars * (4 if self.rotate else 1)
        if n_way > n_classes:
            raise ValueError(f"{n_way}-way episodes need {n_way} classes; the split has {n_classes}")
        if n_shot + n_query > self.n_drawings:
            raise ValueError(
                f"{n_shot} shots + {n_query} queries exceed the {self.n_drawings} drawings per class"
            )
