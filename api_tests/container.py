"""The image of ./Dockerfile, built and run where there is neither a Docker engine nor a registry:
Debian's buildah builds it on a local Debian base (docker/local-base.sh) from a local wheelhouse, so
no network is needed, and `buildah run` starts the image's own CMD on the host network.

Needs root, buildah and debootstrap (.ci/run installs them); the base image and the wheels are kept
in $METANET_CI_CACHE (default /var/cache/metanet-ci) between runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from api_tests.harness import descendants, parent_of, wait_ready
from api_tests.helpers import REPO

TORCH_VERSION = "2.13.0"  # the Dockerfile's default TORCH_VERSION
WHEELS_IN_CONTEXT = REPO / "docker" / "wheels"  # the Dockerfile's default WHEELS_DIR
CACHE = Path(os.environ.get("METANET_CI_CACHE", "/var/cache/metanet-ci"))
ISOLATION = ("--isolation", "chroot")  # no runc/crun needed, and it shares the host network


def require_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("buildah needs root here (no rootless setup)")
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs it with apt-get)")


def run(args: Sequence[str], log: Path, timeout: float, *, extra_env: dict[str, str] | None = None) -> str:
    """Run a command, its stderr (and a copy of stdout) appended to `log`; returns its stdout."""
    with open(log, "ab") as sink:
        sink.write(f"\n$ {' '.join(args)}\n".encode())
        sink.flush()
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=sink, timeout=timeout,
                              env={**os.environ, **(extra_env or {})})
        sink.write(done.stdout)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{args[0]} {args[1]} exited with {done.returncode}:\n{tail}")
    return done.stdout.decode()


def base_image(log: Path) -> str:
    """$METANET_CONTAINER_BASE if set (any image with python3), else the local Debian base."""
    if base := os.environ.get("METANET_CONTAINER_BASE"):
        return base
    out = run(["bash", str(REPO / "docker" / "local-base.sh")], log, timeout=1800)
    return out.strip().splitlines()[-1]


@contextmanager
def working_container(image: str, log: Path) -> Iterator[str]:
    name = f"metanet-test-{uuid.uuid4().hex[:10]}"
    run(["buildah", "from", "--pull=false", "--name", name, image], log, timeout=300)
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, timeout=120)


def python_of(image: str, log: Path) -> tuple[str, str]:
    """(Python version, glibc version) of the image's python3: what its wheels must fit."""
    with working_container(image, log) as ctr:
        out = run(["buildah", "run", *ISOLATION, ctr, "--", "python3", "-c",
                   "import platform; print(platform.python_version(), platform.libc_ver()[1])"],
                  log, timeout=120)
    version, glibc = out.split()
    return version, glibc


def requirements() -> list[str]:
    """What the Dockerfile installs: torch, the build backend, the dependencies and the serve extra."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    return [f"torch=={TORCH_VERSION}", *pyproject["build-system"]["requires"],
            *project["dependencies"], *project["optional-dependencies"]["serve"]]


def wheelhouse(image: str, log: Path) -> Path:
    """Every wheel the Dockerfile needs on `image`, in a cache directory.

    pip downloads on this machine for the image's Python (`--python-version`), but evaluates
    environment markers for its own interpreter: a dependency that only an older patch release needs
    (redis's `async-timeout; python_full_version < "3.11.3"` on Debian's 3.11.2) is missed. So an
    offline `pip install --dry-run` in a container of the image says what is still missing, and
    that is downloaded in turn.
    """
    version, glibc = python_of(image, log)
    major, minor = version.split(".")[:2]
    glibc_minor = int(glibc.split(".")[1]) if glibc else 17
    platforms = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64", "linux_x86_64",
                 *(f"manylinux_2_{m}_x86_64" for m in range(5, glibc_minor + 1))]
    dest = CACHE / f"wheels-cp{major}{minor}-{version}"
    dest.mkdir(parents=True, exist_ok=True)
    wanted, missing = requirements(), requirements()
    for _ in range(5):
        run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest), "--only-binary=:all:",
             "--implementation", "cp", "--python-version", version, "--abi", f"cp{major}{minor}",
             *(f"--platform={p}" for p in platforms), *missing], log, timeout=1800)
        missing = _unresolved(image, dest, wanted, log)
        if not missing:
            return dest
    raise RuntimeError(f"the wheelhouse {dest} still lacks {missing}")


def _unresolved(image: str, wheels: Path, wanted: list[str], log: Path) -> list[str]:
    """Requirements that an offline install from `wheels` fails on, as the image's pip sees them."""
    (wheels / "requirements.txt").write_text("\n".join(wanted) + "\n")
    script = ("python3 -m venv /tmp/venv && /tmp/venv/bin/pip install --quiet --disable-pip-version-check "
              "--dry-run --no-index --find-links /wheels -r /wheels/requirements.txt")
    with working_container(image, log) as ctr:
        done = subprocess.run(["buildah", "run", *ISOLATION, "-v", f"{wheels}:/wheels:ro", ctr, "--",
                               "sh", "-c", script], capture_output=True, text=True, timeout=600)
    if done.returncode == 0:
        return []
    with open(log, "a") as sink:
        sink.write(done.stdout + done.stderr)
    # "No matching distribution found for async-timeout>=4.0.3; python_full_version < "3.11.3""
    found = re.findall(r"No matching distribution found for ([^;\n]+)", done.stderr)
    if not found:
        raise RuntimeError(f"offline install check failed:\n{done.stderr[-3000:]}")
    return [requirement.strip() for requirement in found]


def build(tag: str, base: str, wheels: Path, log: Path) -> None:
    """`buildah bud` of ./Dockerfile on `base`, the wheels placed in the build context meanwhile."""
    WHEELS_IN_CONTEXT.mkdir(exist_ok=True)
    placed = []
    try:
        for wheel in wheels.glob("*.whl"):
            target = WHEELS_IN_CONTEXT / wheel.name
            if not target.exists():
                try:
                    os.link(wheel, target)
                except OSError:
                    shutil.copy2(wheel, target)
                placed.append(target)
        # Docker format: OCI image configs have no HEALTHCHECK and buildah would drop it.
        run(["buildah", "bud", *ISOLATION, "--format", "docker", "--pull=false",
             "--build-arg", f"BASE_IMAGE={base}", "--tag", tag, "--file", str(REPO / "Dockerfile"),
             str(REPO)], log, timeout=3600)
    finally:
        for target in placed:
            target.unlink(missing_ok=True)


def image_config(tag: str, log: Path) -> dict[str, Any]:
    """The image's Docker config: User, Env, Cmd, ExposedPorts, Volumes, Healthcheck, ..."""
    inspected = json.loads(run(["buildah", "inspect", "--type", "image", tag], log, timeout=60))
    return inspected["Docker"]["config"]


def image_size(tag: str, log: Path) -> str:
    return run(["buildah", "images", "--format", "{{.Size}}", tag], log, timeout=60).strip()


def remove_image(tag: str) -> None:
    subprocess.run(["buildah", "rmi", tag], capture_output=True, timeout=300)


class Container:
    """A container of the image running its own CMD, `data_dir` bound at /data, as `docker run -v
    data_dir:/data -e ... IMAGE` would. Stopped as a runtime stops one: SIGTERM to the server."""

    def __init__(self, image: str, data_dir: Path, log_path: Path, env: dict[str, str]) -> None:
        self.image = image
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = env  # METANET_PORT among them: the container shares the host's network
        self.url = f"http://127.0.0.1:{env['METANET_PORT']}"
        self.name = f"metanet-test-{uuid.uuid4().hex[:10]}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, cmd: Sequence[str]) -> Container:
        run(["buildah", "from", "--pull=false", "--name", self.name, self.image], self.log_path, timeout=300)
        # buildah 1.28 under chroot isolation mounts the image's anonymous /data volume in place of
        # a -v bind to the same path; dropping the VOLUME from this working container (not from the
        # image) lets the bind through, which is what `docker run -v` does with it.
        run(["buildah", "config", "--volume", "/data-", self.name], self.log_path, timeout=60)
        env = [arg for key, value in self.env.items() for arg in ("--env", f"{key}={value}")]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["buildah", "run", *ISOLATION, "--volume", f"{self.data_dir}:/data", *env, self.name,
                 "--", *cmd],
                stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 180) -> None:
        assert self.process is not None
        wait_ready(self.url, self.process, timeout, self.log_tail, interval=0.5)

    def exec(self, cmd: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Another process in the running container (as `docker exec`), with the same settings."""
        env = [arg for key, value in self.env.items() for arg in ("--env", f"{key}={value}")]
        return subprocess.run(["buildah", "run", *ISOLATION, *env, self.name, "--", *cmd],
                              capture_output=True, text=True, timeout=timeout)

    def server_pid(self) -> int:
        """The server itself: the one process below `buildah run` that is not buildah's own helper
        (and not one of its own children: the server processes a supervisor runs on a CPU)."""
        assert self.process is not None
        pids = [pid for pid in descendants(self.process.pid)
                if not _comm(pid).startswith(("memfd:", "buildah"))]
        roots = [pid for pid in pids if parent_of(pid) not in pids]
        assert len(roots) == 1, [(pid, _comm(pid)) for pid in pids]
        return roots[0]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the server (what `docker stop` sends PID 1); buildah's exit status (1 when the
        server ends by the signal, as uvicorn does once it has shut down)."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.server_pid(), signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def remove(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        subprocess.run(["buildah", "rm", self.name], capture_output=True, timeout=120)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def uid_of(pid: int) -> tuple[int, ...]:
    """Real, effective, saved and filesystem uid of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return tuple(int(field) for field in line.split()[1:])
    raise AssertionError(f"no Uid line for {pid}")
