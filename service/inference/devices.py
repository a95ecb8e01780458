"""Which device the model runs on. torch is imported only when a question needs it, so a process
that only supervises servers does not load it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.settings import Settings

if TYPE_CHECKING:
    import torch


def pick_device(name: str) -> torch.device:
    """"auto" -> CUDA when present, else CPU; an explicit CUDA device must exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"METANET_DEVICE={name} but CUDA is not available on this machine")
    return device


def runs_on_gpu(settings: Settings) -> bool:
    """Whether the model of a server with these settings will run on a GPU."""
    if settings.device.startswith("cuda"):
        return True
    if settings.device == "auto":
        import torch

        return torch.cuda.is_available()
    return False
