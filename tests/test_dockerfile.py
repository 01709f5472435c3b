"""The Dockerfile, read and run without Docker: its instructions are sound, what it copies exists, its
health check asks a real probe, and its entrypoint serves as the image's unprivileged user would.

``tests/test_docker_image.py`` (slow) builds and runs the real image where a Docker engine runs."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from support import LOCALHOST, PYTHON, REPO, RawOrigin, clean_env, free_port, wait_for

from proxy.cli import build_parser
from proxy.config import ServerSettings
from proxy.control.probes import ROUTES

DOCKERFILE = REPO / "Dockerfile"
NOBODY = 65534


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def only(name: str) -> str:
    found = [args for word, args in instructions(DOCKERFILE.read_text()) if word == name]
    assert len(found) == 1, f"expected one {name} in the Dockerfile, found {found}"
    return found[0]


def exec_form(args: str) -> list[str]:
    """A JSON array (exec form: the process is PID 1 and gets SIGTERM, no shell in between)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env() -> dict[str, str]:
    """Every ``ENV KEY=VALUE`` (the ``KEY=VALUE ...`` form, values without spaces)."""
    values: dict[str, str] = {}
    for word, args in instructions(DOCKERFILE.read_text()):
        if word == "ENV":
            values.update(pair.split("=", 1) for pair in args.split())
    return values


def healthcheck() -> list[str]:
    options, _, command = only("HEALTHCHECK").partition("CMD ")
    assert "--interval" in options and "--timeout" in options, options
    return exec_form(command)


def test_instructions() -> None:
    steps = instructions(DOCKERFILE.read_text())
    assert [word for word, _ in steps].count("FROM") >= 1
    user = only("USER")
    assert user not in ("root", "0") and not user.startswith("0:"), user
    assert [word for word, _ in steps][-1] == "CMD", "ENTRYPOINT and CMD close the file"
    assert exec_form(only("ENTRYPOINT"))[:2] == ["flagproxy", "serve"]
    exec_form(only("CMD"))
    assert healthcheck()[0] == "python"
    assert exec_form(only("VOLUME")), "a writable place for what the process writes"


def test_copied_paths_exist_and_are_in_the_build_context() -> None:
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    allowed = [rule[1:].rstrip("/") for rule in ignore if rule.startswith("!")]
    assert "*" in ignore, ".dockerignore is an allow-list"
    sources = []
    for word, args in instructions(DOCKERFILE.read_text()):
        if word == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path"
        assert any(fnmatch.fnmatch(source.rstrip("/"), rule) for rule in allowed), (
            f"COPY {source}: left out of the build context by .dockerignore"
        )


def test_healthcheck_asks_a_real_probe() -> None:
    paths = re.findall(r"/__flags(/[a-z]+)", " ".join(healthcheck()))
    assert paths, healthcheck()
    assert ServerSettings().control_prefix == "/__flags"
    routes = {route.path for route in ROUTES}
    assert set(paths) <= routes, f"{paths} not among the probe routes {routes}"


def test_compose_services_run_commands_the_cli_takes() -> None:
    """docker-compose.yml's services built from this Dockerfile: each command parses, and the image's
    health check (flagproxy serve's probe on 8080) stays on only where flagproxy serve runs there."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    built = {name: service for name, service in services.items() if service.get("build") == "."}
    assert len(built) >= 2
    for name, service in built.items():
        argv = [*service.get("entrypoint", exec_form(only("ENTRYPOINT"))), *service.get("command", [])]
        assert argv[0] == "flagproxy", name
        args = build_parser().parse_args(argv[1:])
        if args.command == "serve":
            assert args.port in (None, 8080) and "healthcheck" not in service, name
        else:
            assert service.get("healthcheck") == {"disable": True}, f"{name}: the image's check would fail"


@pytest.fixture
def image_root() -> Iterator[Path]:
    """A stand-in for the image's file system: WORKDIR with what is COPYed there, read-only and
    owned by root; the VOLUME directories writable by the user the entrypoint runs as."""
    root = Path(tempfile.mkdtemp(prefix="flagproxy-image-"))
    os.chmod(root, 0o755)
    workdir = root / only("WORKDIR").lstrip("/")
    workdir.mkdir(parents=True)
    for word, args in instructions(DOCKERFILE.read_text()):
        source, _, target = args.rpartition(" ")
        if word == "COPY" and target.startswith("./"):  # into WORKDIR
            shutil.copytree(REPO / source, workdir / target)
    os.chmod(workdir, 0o555)
    for volume in exec_form(only("VOLUME")):
        path = root / volume.lstrip("/")
        path.mkdir(parents=True)
        if os.geteuid() == 0:
            os.chown(path, NOBODY, NOBODY)
    yield root
    os.chmod(workdir, 0o755)  # a user who is not root cannot empty a read-only directory
    shutil.rmtree(root)


def reachable_by_others(path: Path) -> bool:
    """Every directory above ``path`` lets other users through (a checkout under a 0700 temporary
    directory does not: nobody could not even start its interpreter)."""
    return all(os.stat(parent).st_mode & 0o001 for parent in path.resolve().parents)


def as_image_user(command: list[str]) -> list[str]:
    """Run as nobody when the tests run as root (the image's USER is no root either)."""
    if os.geteuid() != 0:
        return command
    if not reachable_by_others(Path(command[0])):
        # A checkout under a directory closed to other users (a 0700 temporary directory): nobody
        # cannot start its interpreter, so the entrypoint runs as root; the health check, the
        # image's own seeds and the records in the volume are still checked.
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop to an unprivileged user")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def test_entrypoint_serves_as_the_image_user(image_root: Path, origin: RawOrigin) -> None:
    """ENTRYPOINT + CMD with the image's ENV (its absolute paths under the stand-in root), as an
    unprivileged user in a read-only WORKDIR: the health check passes and experiment records, the
    first thing it writes, land in the volume."""
    port = free_port()
    image_env = {key: value for key, value in env().items() if key.startswith(("FLAGPROXY_", "PYTHON"))}
    for key, value in image_env.items():
        if value.startswith("/"):
            image_env[key] = str(image_root / value.lstrip("/"))
    serve_env = {"FLAGPROXY_SERVER_PORT": str(port), "FLAGPROXY_ORIGINS": origin.url}
    environment = clean_env({**image_env, **serve_env})
    executable = str(Path(PYTHON).parent / exec_form(only("ENTRYPOINT"))[0])
    args = [LOCALHOST if arg == "0.0.0.0" else arg for arg in exec_form(only("CMD"))]
    command = [executable, *exec_form(only("ENTRYPOINT"))[1:], *args]
    workdir = image_root / only("WORKDIR").lstrip("/")
    stderr = image_root / "stderr"
    with open(stderr, "wb") as err:
        process = subprocess.Popen(as_image_user(command), cwd=workdir, env=environment, stderr=err)
    try:
        check = [PYTHON, *healthcheck()[1:]]
        wait_for(
            lambda: subprocess.run(check, env=environment, capture_output=True, timeout=5).returncode == 0,
            timeout=20,
            interval=0.1,
            what=f"the HEALTHCHECK command to pass; stderr: {stderr.read_text()}",
        )
        response = httpx.get(f"http://{LOCALHOST}:{port}/signals", headers={"X-User-Id": "42"}, timeout=5)
        assert response.status_code == 200, response.text
        records = Path(image_env["FLAGPROXY_EXPERIMENTS_PATH"])
        wait_for(records.exists, timeout=10, interval=0.05, what=f"{records}; stderr: {stderr.read_text()}")
        assert "Permission denied" not in stderr.read_text()
        # the image's own seeds (COPY seeds), not a checkout's found by an editable install
        assert f"from {workdir / 'seeds' / 'flags.json'}" in stderr.read_text(), stderr.read_text()
    finally:
        process.terminate()
        process.wait(10)
