"""Omniglot: loading (packed npz, PNG folders, the official zip files), the canonical framing to the
model's 28x28 ink=1 input (model.transform), the background/validation/evaluation split and the
episode sampler (uneven shots and augmentation included).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.augment import Augment
from model.config import TRAINING_SPLITS
from model.transform import frame

DATA_DIR_ENV = "METANET_OMNIGLOT_DIR"
SPLITS = ("background", "evaluation")
PAPER_SPLIT_FILE = Path(__file__).resolve().parent / "splits" / "omniglot-1200-423.json"


@dataclass(frozen=True)
class OmniglotSplit:
    """One Omniglot split: framed images of shape (n_chars, n_drawings, 28, 28), float32, ink = 1,
    and, where loaded from the data set, the drawings as drawn (`raw`, (n_chars, n_drawings, H, W)
    uint8, ink = 1), which augmentation and the robustness benchmark start from."""

    images: np.ndarray
    alphabet: np.ndarray  # (n_chars,) str
    character: np.ndarray  # (n_chars,) str
    raw: np.ndarray | None = None

    def select_alphabets(self, names: set[str], keep: bool = True) -> OmniglotSplit:
        return self._rows(np.isin(self.alphabet, sorted(names)), keep)

    def select_characters(self, names: set[tuple[str, str]], keep: bool = True) -> OmniglotSplit:
        """The characters named (alphabet, character), in this split's order (keep=False: the others)."""
        pairs = zip(self.alphabet, self.character, strict=True)
        return self._rows(np.array([pair in names for pair in pairs], bool), keep)

    def _rows(self, mask: np.ndarray, keep: bool) -> OmniglotSplit:
        mask = mask if keep else ~mask
        raw = None if self.raw is None else self.raw[mask]
        return OmniglotSplit(self.images[mask], self.alphabet[mask], self.character[mask], raw)

    @staticmethod
    def concatenate(first: OmniglotSplit, second: OmniglotSplit) -> OmniglotSplit:
        raw = None if first.raw is None or second.raw is None else np.concatenate([first.raw, second.raw])
        return OmniglotSplit(np.concatenate([first.images, second.images]),
                             np.concatenate([first.alphabet, second.alphabet]),
                             np.concatenate([first.character, second.character]), raw)

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


def frame_drawings(ink: np.ndarray, size: int = 28) -> np.ndarray:
    """Drawings (..., H, W) with ink = 1 -> framed model inputs (..., size, size) float32
    (`model.transform.frame`), 256 at a time to bound the memory it takes."""
    lead, (height, width) = ink.shape[:-2], ink.shape[-2:]
    flat = ink.reshape(-1, height, width)
    out = np.empty((len(flat), size, size), dtype=np.float32)
    for start in range(0, len(flat), 256):
        out[start : start + 256] = frame(flat[start : start + 256].astype(np.float32), size)
    return out.reshape(*lead, size, size)


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
        raw = np.unpackbits(d["images"], axis=-1)[..., : int(d["width"])]
        alphabet, character = d["alphabet"], d["character"]
    return OmniglotSplit(frame_drawings(raw, size), alphabet.astype(str), character.astype(str), raw)


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
            grey = np.asarray(Image.open(io.BytesIO(blob)).convert("L"))
            drawings.append((grey < 128).astype(np.uint8))  # black strokes -> ink = 1
        chars.append(np.stack(drawings))
        alphabets.append(alphabet)
        characters.append(character)
    if not chars:
        raise FileNotFoundError("no PNG drawings found")
    n_draw = min(len(c) for c in chars)
    raw = np.stack([c[:n_draw] for c in chars])
    return OmniglotSplit(frame_drawings(raw, size), np.array(alphabets), np.array(characters), raw)


def train_val_split(
    background: OmniglotSplit, n_val_alphabets: int = 4
) -> tuple[OmniglotSplit, OmniglotSplit]:
    """Hold out every k-th background alphabet (sorted by name) for validation.

    The evaluation alphabets are never seen in training or model selection.
    """
    names = background.alphabets
    # Keep at least one alphabet to train on: a small or test data set may have no more alphabets
    # than n_val_alphabets.
    n_val = min(n_val_alphabets, len(names) - 1)
    step = max(1, len(names) // max(1, n_val))
    val = set(names[step - 1 :: step][:n_val]) if n_val > 0 else set()
    return background.select_alphabets(val, keep=False), background.select_alphabets(val)


def paper_split(data_dir: str | os.PathLike[str] | None, size: int = 28) -> dict[str, OmniglotSplit]:
    """Omniglot's 1,200 / 423 character split (Vinyals et al., 2016; the lists, with their source,
    in `PAPER_SPLIT_FILE`): {"train": 1,028 characters, "val": 172, "test": 423} of the background
    and evaluation sets together."""
    listed = json.loads(PAPER_SPLIT_FILE.read_text())
    names = {part: {(a, c) for a, chars in listed[part].items() for c in chars} for part in ("val", "test")}
    every = OmniglotSplit.concatenate(load_split(data_dir, "background", size),
                                      load_split(data_dir, "evaluation", size))
    found = {(a, c) for a, c in zip(every.alphabet, every.character, strict=True)}
    missing = (names["val"] | names["test"]) - found
    if missing:
        raise FileNotFoundError(f"the 1,200 / 423 split names {len(missing)} characters the data set lacks, "
                                f"e.g. {'/'.join(sorted(missing)[0])}")
    return {"train": every.select_characters(names["val"] | names["test"], keep=False),
            "val": every.select_characters(names["val"]), "test": every.select_characters(names["test"])}


def training_splits(
    data_dir: str | os.PathLike[str] | None, split: str = "background", size: int = 28
) -> tuple[OmniglotSplit, OmniglotSplit]:
    """(train, validation) characters of one of `TRAINING_SPLITS`."""
    if split == "background":
        return train_val_split(load_split(data_dir, "background", size))
    if split == "1200":
        parts = paper_split(data_dir, size)
        return parts["train"], parts["val"]
    raise ValueError(f"split must be one of {TRAINING_SPLITS}, got {split!r}")


def scoring_split(
    data_dir: str | os.PathLike[str] | None, split: str = "background", size: int = 28
) -> OmniglotSplit:
    """The characters a model trained on `split` is scored on: the evaluation set, or the 423."""
    if split == "background":
        return load_split(data_dir, "evaluation", size)
    if split == "1200":
        return paper_split(data_dir, size)["test"]
    raise ValueError(f"split must be one of {TRAINING_SPLITS}, got {split!r}")


@dataclass(frozen=True)
class Episode:
    support_x: Tensor  # (n_support, 1, 28, 28), class by class
    support_y: Tensor  # (n_support,) class ids 0..n_way-1
    query_x: Tensor  # (n_way * n_query, 1, 28, 28)
    query_y: Tensor  # (n_way * n_query,)
    n_way: int


class EpisodeSampler:
    """N-way episodes from a split; with `rotate`, each class is a character turned by a random
    multiple of 90 degrees (support and queries alike), which makes new classes; with an active
    `augment` and a split that holds its drawings as drawn, a share of the drawings is varied
    (model.augment) before framing, each on its own."""

    def __init__(self, split: OmniglotSplit, *, rotate: bool, device: torch.device | str = "cpu",
                 augment: Augment | None = None):
        self.images = torch.from_numpy(split.images)
        self.size = self.images.shape[-1]
        self.raw = split.raw
        self.rotate = rotate
        self.augment = augment if augment is not None and augment.active and split.raw is not None else None
        self.device = torch.device(device)
        self.n_chars, self.n_drawings = self.images.shape[:2]

    def sample(
        self, rng: np.random.Generator, n_way: int, n_shot: int | Sequence[int], n_query: int
    ) -> Episode:
        """An episode of n_way classes, n_shot support examples each (or shots[k] for class k: an
        uneven support set) and n_query queries each."""
        shots = [n_shot] * n_way if isinstance(n_shot, int) else [int(k) for k in n_shot]
        if len(shots) != n_way:
            raise ValueError(f"{len(shots)} shot counts for {n_way} classes")
        self._check_episode_fits(n_way, max(shots), n_query)
        n_classes = self.n_chars * (4 if self.rotate else 1)
        classes = rng.choice(n_classes, size=n_way, replace=False)
        chars, drawings, turns = [], [], []
        for cls, shot in zip(classes, shots, strict=True):
            char, turn = divmod(int(cls), 4) if self.rotate else (int(cls), 0)
            chars.append(char)
            drawings.append(rng.choice(self.n_drawings, size=shot + n_query, replace=False))
            turns.append(turn)
        # Support images first, class by class, then the queries.
        order = [(k, d) for k, shot in enumerate(shots) for d in drawings[k][:shot]]
        order += [(k, d) for k in range(n_way) for d in drawings[k][shots[k]:]]
        char_of = np.array([chars[k] for k, _ in order])
        drawing_of = np.array([d for _, d in order])
        if self.augment is not None:
            assert self.raw is not None
            raw = torch.from_numpy(self.raw[char_of, drawing_of]).to(self.device)
            x = self.augment(raw, rng, self.size)
        else:
            x = self.images[torch.as_tensor(char_of), torch.as_tensor(drawing_of)].to(self.device)
        turn_of = np.array([turns[k] for k, _ in order])
        for turn in np.unique(turn_of[turn_of > 0]):
            rows = torch.as_tensor(np.flatnonzero(turn_of == turn), device=self.device)
            x[rows] = torch.rot90(x[rows], int(turn), dims=(-2, -1))
        n_support = sum(shots)
        labels = torch.arange(n_way, device=self.device)
        return Episode(
            support_x=x[:n_support].unsqueeze(1),
            support_y=labels.repeat_interleave(torch.as_tensor(shots, device=self.device)),
            query_x=x[n_support:].unsqueeze(1),
            query_y=labels.repeat_interleave(n_query),
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
