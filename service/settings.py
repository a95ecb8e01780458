"""Every knob of the service, read once from the environment (`METANET_*`) or from the CLI.

No other module reads the environment: the factory takes a `Settings`, so tests pass their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Service configuration; each field `foo` is set by the environment variable `METANET_FOO`."""

    model_config = SettingsConfigDict(env_prefix="METANET_", extra="ignore", frozen=True)

    # Where to listen.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    # The model: "auto" picks CUDA when present; a weights directory, or None for the shipped weights.
    device: str = "auto"
    checkpoint: Path | None = None
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default")

    # The task store (SQLite file under data_dir) and the in-memory cache of task memories.
    data_dir: Path = Path("var")
    cache_bytes: int = Field(1024 * MiB, ge=0, description="budget of the task-memory LRU cache")

    # Limits on what one request may hold. Bodies are capped before they are parsed, images before
    # they are decoded.
    max_body_bytes: int = Field(16 * MiB, ge=1024)
    max_image_bytes: int = Field(4 * MiB, ge=64, description="encoded bytes of one image")
    max_image_pixels: int = Field(16_000_000, ge=1, description="width x height of one image")
    max_images_per_request: int = Field(128, ge=1)
    max_examples: int = Field(100, ge=2, description="support examples per task (capped by the model's)")
    max_pending: int = Field(32, ge=1, description="model jobs queued before requests get 429")

    # Bearer keys for /v1; empty = no auth. METANET_API_KEYS takes a comma-separated list.
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto" and value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @property
    def database_path(self) -> Path:
        return self.data_dir / "tasks.sqlite3"
