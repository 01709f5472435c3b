"""The real image: ``docker build``, then ``docker run`` until Docker's own health check says healthy
and the readiness probe answers through the published port (slow: make test-slow).

Skipped where no Docker engine answers, or where the base image is not present locally (the test
never pulls): FLAGPROXY_DOCKER_BASE names another (scripts/docker-base-debian.sh makes one from
Debian's packages)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from support import LOCALHOST, REPO, free_port

pytestmark = pytest.mark.slow

DEFAULT_BASE = "python:3.12-slim"  # the Dockerfile's ARG BASE
TAG = "flagproxy:test-image"


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if shutil.which("docker") is None:
        pytest.skip("no docker command")
    if docker("info", timeout=20).returncode != 0:
        pytest.skip("no Docker engine answers (docker info failed)")
    base = os.environ.get("FLAGPROXY_DOCKER_BASE") or DEFAULT_BASE
    if docker("image", "inspect", base).returncode != 0:
        pytest.skip(f"base image {base} is not present locally: docker pull it, or set FLAGPROXY_DOCKER_BASE")
    build = docker(
        "build", "--network", "host", "--build-arg", f"BASE={base}", "-t", TAG, str(REPO), timeout=600
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    yield TAG
    docker("rmi", "--force", TAG)


def test_image_runs_healthy_as_non_root(image: str) -> None:
    port = free_port()
    run = docker(
        "run", "--detach", "--publish", f"{LOCALHOST}:{port}:8080",
        "--env", "FLAGPROXY_ORIGINS=http://127.0.0.1:9", image,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    container = run.stdout.strip()
    try:
        deadline = time.monotonic() + 60
        state: dict[str, object] = {}
        while time.monotonic() < deadline:
            state = json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)
            health = state.get("Health")
            if isinstance(health, dict) and health.get("Status") == "healthy":
                break
            assert state.get("Running"), (state, docker("logs", container).stderr[-4000:])
            time.sleep(0.5)  # Docker runs the health check every --interval; bounded by the deadline
        else:
            raise AssertionError(
                f"not healthy after 60 s: {state}\n{docker('logs', container).stderr[-4000:]}"
            )
        assert docker("exec", container, "id", "-u").stdout.strip() != "0"
        ready = httpx.get(f"http://{LOCALHOST}:{port}/__flags/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["flags"] > 0, ready.text
    finally:
        docker("rm", "--force", container)
