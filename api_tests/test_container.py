"""The container image: ./Dockerfile built with buildah on a local Debian base from local wheels, its
own CMD run as the image says (user, environment, /data volume), and the API driven over loopback.

The first run builds the base image (debootstrap) and fills the wheel cache; every run builds the
service image (a few minutes on two cores) and removes it afterwards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api_tests import container
from api_tests.helpers import QUERIES, examples, free_port, probabilities

pytestmark = pytest.mark.container

UID = 10001  # the Dockerfile's `metanet` user


@dataclass
class Image:
    tag: str
    config: dict[str, Any]
    log: Path
    work: Path


@pytest.fixture(scope="module")
def say(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Progress on the terminal even while output is captured: the build takes minutes."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(message: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"\n[container] {message}", flush=True)

    return say


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, say: Callable[[str], None]) -> Iterator[Image]:
    container.require_tools()
    work = tmp_path_factory.mktemp("container")
    log = work / "build.log"
    tag = f"localhost/metanet-service:test-{os.getpid()}"
    try:
        started = time.monotonic()
        say(f"base image (debootstrap on the first run; log: {log})")
        base = container.base_image(log)
        say(f"{base} ready after {time.monotonic() - started:.0f} s; wheels for it")
        wheels = container.wheelhouse(base, log)
        say(f"{len(list(wheels.glob('*.whl')))} wheels in {wheels}; buildah bud")
        built = time.monotonic()
        container.build(tag, base, wheels, log)
        say(f"{tag} built in {time.monotonic() - built:.0f} s, {container.image_size(tag, log)}")
        yield Image(tag, container.image_config(tag, log), log, work)
    finally:
        container.remove_image(tag)


def start(image: Image, data_dir: Path) -> container.Container:
    """The image's own CMD with the settings `docker run -e` would pass: loopback, a free port, and
    one torch thread (the test machine's cores are shared)."""
    env = {"METANET_HOST": "127.0.0.1", "METANET_PORT": str(free_port()), "METANET_TORCH_THREADS": "1"}
    ctr = container.Container(image.tag, data_dir, image.work / f"{data_dir.name}.log", env)
    ctr.start(image.config["Cmd"])
    ctr.wait_ready()
    return ctr


@pytest.fixture(scope="module")
def data_dir(image: Image) -> Path:
    """The host directory bound at /data, writable by the image's user only (as a volume would be)."""
    path = image.work / "data"
    path.mkdir()
    os.chown(path, UID, UID)
    path.chmod(0o700)
    return path


@pytest.fixture(scope="module")
def running(image: Image, data_dir: Path) -> Iterator[container.Container]:
    ctr = start(image, data_dir)
    try:
        yield ctr
    finally:
        ctr.remove()


def test_image_declares_user_volume_port_settings_healthcheck_and_exec_form_cmd(image: Image) -> None:
    config = image.config
    assert config["User"] in ("metanet", str(UID))
    assert "/data" in config["Volumes"]
    assert "8000/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["METANET_DATA_DIR"] == "/data"
    assert env["METANET_HOST"] == "0.0.0.0" and env["METANET_PORT"] == "8000"
    assert config["Cmd"][0] != "/bin/sh" and not config.get("Entrypoint")  # exec form: no shell between
    test = config["Healthcheck"]["Test"]
    assert test[0] == "CMD" and any("/healthz" in part for part in test)


def test_container_serves_register_classify_and_metrics(running: container.Container) -> None:
    with httpx.Client(base_url=running.url, timeout=120) as client:
        assert client.get("/healthz").status_code == 200
        model = client.get("/v1/model").json()
        assert model["device"] == "cpu", model

        response = client.post("/v1/tasks", json={"name": "container",
                                                  "examples": examples(["circle", "cross", "triangle"])})
        assert response.status_code == 201, response.text
        task = response.json()
        response = client.post(f"/v1/tasks/{task['task_id']}/classify", json={"images": QUERIES})
        assert response.status_code == 200, response.text
        assert [p["label"] for p in response.json()["predictions"]] == ["circle", "cross", "triangle"]

        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert 'route="/v1/tasks/{task_id}/classify",status="200"' in metrics.text
        assert "metanet_tasks 1.0" in metrics.text


def test_server_runs_as_non_root_user(running: container.Container) -> None:
    assert container.uid_of(running.server_pid()) == (UID,) * 4


def test_image_healthcheck_passes_in_the_running_container(
    image: Image, running: container.Container
) -> None:
    done = running.exec(image.config["Healthcheck"]["Test"][1:])
    assert done.returncode == 0, done.stderr


def test_task_store_lands_in_data_and_survives_a_new_container(
    image: Image, running: container.Container, data_dir: Path
) -> None:
    with httpx.Client(base_url=running.url, timeout=120) as client:
        task = client.post("/v1/tasks", json={"examples": examples(["square", "zigzag"])}).json()
        before = probabilities(client, task["task_id"])
    database = data_dir / "tasks.sqlite3"
    assert database.is_file(), sorted(p.name for p in data_dir.iterdir())
    assert database.stat().st_uid == UID

    # SIGTERM, as `docker stop` sends: the server drains and closes the store (WAL checkpointed).
    # Its exit status is not checked: uvicorn re-raises the SIGTERM, and buildah reports that as 1.
    running.stop()
    assert "Application shutdown complete" in running.log_tail(), running.log_tail()
    wal = data_dir / "tasks.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    again = start(image, data_dir)
    try:
        with httpx.Client(base_url=again.url, timeout=120) as client:
            assert client.get(f"/v1/tasks/{task['task_id']}").json() == task
            np.testing.assert_allclose(probabilities(client, task["task_id"]), before, atol=1e-6, rtol=0)
    finally:
        again.stop()
        again.remove()
