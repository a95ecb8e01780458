"""Tiny synthetic Omniglot stand-ins built in code: random pen strokes, ink = 1, written in the three
on-disk layouts `model.data.load_split` reads (packed npz, PNG folders, the official zip).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def draw_strokes(rng: np.random.Generator, size: int, n_strokes: int = 3, width: int = 0) -> np.ndarray:
    """One binary drawing of shape (size, size), uint8, ink = 1: a few straight thick pen strokes."""
    width = width or max(1, size // 14)
    canvas = np.zeros((size, size), dtype=np.uint8)
    for _ in range(n_strokes):
        (r0, c0), (r1, c1) = rng.integers(width, size - width, size=(2, 2))
        for t in np.linspace(0.0, 1.0, 2 * size):
            r, c = round(r0 + t * (r1 - r0)), round(c0 + t * (c1 - c0))
            canvas[max(0, r - width) : r + width + 1, max(0, c - width) : c + width + 1] = 1
    return canvas


def draw_characters(rng: np.random.Generator, n_chars: int, n_drawings: int, size: int = 105) -> np.ndarray:
    """(n_chars, n_drawings, size, size) uint8 drawings, ink = 1; drawings of a character share a
    skeleton (its first stroke) so a character is a class, not noise."""
    out = np.empty((n_chars, n_drawings, size, size), dtype=np.uint8)
    for c in range(n_chars):
        skeleton = draw_strokes(rng, size, n_strokes=2)
        for d in range(n_drawings):
            out[c, d] = skeleton | draw_strokes(rng, size, n_strokes=1)
    return out


def layout_names(n_alphabets: int, chars_per_alphabet: int) -> tuple[list[str], list[str]]:
    """Alphabet and character folder names per character, in the sorted order of the real data."""
    alphabets = [f"Alphabet_{a:02d}" for a in range(n_alphabets) for _ in range(chars_per_alphabet)]
    characters = [f"character{c + 1:02d}" for _ in range(n_alphabets) for c in range(chars_per_alphabet)]
    return alphabets, characters


def write_npz(
    path: Path, ink: np.ndarray, alphabets: list[str], characters: list[str], first_id: int = 1
) -> Path:
    """The packed layout of /work/shared/data/omniglot/README.md: packbits along the width."""
    n_chars, n_draw, height, width = ink.shape
    char_id = np.arange(first_id, first_id + n_chars, dtype=np.int32)
    np.savez_compressed(
        path,
        images=np.packbits(ink, axis=-1),
        height=np.int32(height),
        width=np.int32(width),
        alphabet=np.array(alphabets),
        character=np.array(characters),
        drawer_file=np.array([[f"{i:04d}_{j + 1:02d}.png" for j in range(n_draw)] for i in char_id]),
        char_id=char_id,
    )
    return path


def png_bytes(ink: np.ndarray) -> bytes:
    """A drawing as the real PNGs hold it: mode "1", black strokes on white."""
    buf = io.BytesIO()
    Image.fromarray(np.where(ink > 0, 0, 255).astype(np.uint8)).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def png_files(
    top: str, ink: np.ndarray, alphabets: list[str], characters: list[str], first_id: int = 1
) -> dict[str, bytes]:
    """{'images_<split>/<alphabet>/<character>/XXXX_NN.png': bytes} for every drawing."""
    files = {}
    for c, (alphabet, character) in enumerate(zip(alphabets, characters, strict=True)):
        for d in range(ink.shape[1]):
            files[f"{top}/{alphabet}/{character}/{first_id + c:04d}_{d + 1:02d}.png"] = png_bytes(ink[c, d])
    return files


def write_png_folder(root: Path, files: dict[str, bytes]) -> None:
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    """The official archive layout, directory entries included."""
    with zipfile.ZipFile(path, "w") as zf:
        folders = sorted({name.rsplit("/", i)[0] + "/" for name in files for i in (1, 2, 3)})
        for folder in folders:
            zf.writestr(folder, b"")
        for name, blob in files.items():
            zf.writestr(name, blob)
    return path


def write_omniglot_npz_dir(
    root: Path,
    *,
    seed: int,
    background: tuple[int, int],
    evaluation: tuple[int, int],
    n_drawings: int = 20,
    size: int = 105,
) -> Path:
    """A data directory with omniglot_background.npz and omniglot_evaluation.npz.

    background / evaluation: (n_alphabets, characters per alphabet).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    first_id = 1
    for split, (n_alpha, per_alpha) in (("background", background), ("evaluation", evaluation)):
        alphabets, characters = layout_names(n_alpha, per_alpha)
        alphabets = [f"{split}_{a}" for a in alphabets]
        ink = draw_characters(rng, n_alpha * per_alpha, n_drawings, size)
        write_npz(root / f"omniglot_{split}.npz", ink, alphabets, characters, first_id)
        first_id += len(ink)
    return root
