"""The README's commands, run against what ``make run`` starts, print what the README says.

``make run`` is ``flagproxy demo-origin`` and ``flagproxy serve --config config/demo.toml``; here the
same two commands run on free ports (from another directory, as a user might), and every shell and
Python block of the README that talks to the proxy runs in document order, as a reader would run
them. A command followed by ``# ...`` lines must print that (JSON compared as JSON); every command
must succeed, and none may answer a JSON error. The top-of-page header sample and the flags-file
excerpt are compared with what the demo origin receives and with ``seeds/flags.json``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support import PYTHON, REPO, clean_env, free_port

README = (REPO / "README.md").read_text()
DEMO = tomllib.loads((REPO / "config" / "demo.toml").read_text())
FLAGPROXY = str(Path(PYTHON).parent / "flagproxy")


@dataclass
class Block:
    lang: str
    lines: list[str]
    start: int  # line number in the README, for messages

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def blocks() -> list[Block]:
    found, current, lang, start = [], None, "", 0
    for number, line in enumerate(README.splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current, lang, start = [], line[3:].strip(), number
            else:
                found.append(Block(lang, current, start))
                current = None
            continue
        if current is not None:
            current.append(line)
    return found


def runnable(block: Block) -> bool:
    """Blocks that talk to the running proxy; not the ones that start one or install things."""
    if block.lang not in ("sh", "bash", "python"):
        return False
    if re.search(r"\bmake (run|test)\b|flagproxy serve|demo-origin|docker ", block.text):
        return False
    return "localhost:8080" in block.text or ".venv/bin/flagproxy" in block.text or "export " in block.text


@dataclass
class Step:
    command: str
    expected: str  # the "# ..." lines after it, "" when the README shows no output


def steps(block: Block) -> list[Step]:
    """Commands (continuation lines joined) and the output the README shows after each."""
    result: list[Step] = []
    pending: list[str] = []
    for line in block.lines:
        if line.startswith("#") and result and not pending:
            shown = line[1:].strip()
            result[-1].expected = (result[-1].expected + " " + shown).strip()
            continue
        if not line.strip():
            continue
        pending.append(line)
        opened = "".join(pending).count("(") - "".join(pending).count(")")
        if line.endswith("\\") or (block.lang == "python" and opened > 0):
            continue
        result.append(Step("\n".join(pending), ""))
        pending = []
    return result


def on_port(text: str, port: int) -> str:
    return text.replace("localhost:8080", f"127.0.0.1:{port}").replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} not up"
        time.sleep(0.05)  # readiness of a subprocess, bounded


@dataclass
class Demo:
    port: int
    stderr: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """``make run``'s two commands, on free ports, started from a directory that is not the checkout."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    origin_port, port = free_port(), free_port()
    env = clean_env({"FLAGPROXY_EXPERIMENTS_PATH": str(elsewhere / "experiments.sqlite3")})
    origin = subprocess.Popen(
        [FLAGPROXY, "demo-origin", "--port", str(origin_port)],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stderr = elsewhere / "proxy.stderr"
    origin_arg = ["--origin", f"http://127.0.0.1:{origin_port}"]
    with stderr.open("wb") as sink:
        proxy = subprocess.Popen(
            [
                FLAGPROXY,
                "serve",
                "--config",
                str(REPO / "config" / "demo.toml"),
                "--port",
                str(port),
                *origin_arg,
            ],
            cwd=elsewhere,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        wait_for(f"http://127.0.0.1:{origin_port}/", origin)
        wait_for(f"http://127.0.0.1:{port}/__flags/readyz", proxy)
        yield Demo(port, stderr)
    finally:
        for process in (proxy, origin):
            process.terminate()
            process.wait(10)


def test_make_run_prints_the_demo_secrets_it_configures() -> None:
    recipe = (REPO / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0]
    secrets = [DEMO["admin"]["token"], DEMO["webhooks"]["secret"], DEMO["client_keys"][0]["key"]]
    for secret in secrets:
        assert secret in recipe and "not-secret" in secret  # printed, and plainly not a real one
    assert "DEMO-ONLY" in recipe
    assert "flagproxy serve --config config/demo.toml" in recipe


def test_the_header_sample_is_what_the_origin_receives(demo: Demo) -> None:
    sample = next(b for b in blocks() if b.lang == "")
    shown = dict(line.split(": ", 1) for line in sample.lines)
    echoed = httpx.get(f"http://127.0.0.1:{demo.port}/api/anything", headers={"X-User-Id": "42"}).json()
    assert echoed["headers"]["x-feature-flags"] == shown["X-Feature-Flags"]
    assert echoed["headers"]["x-feature-flags-config"] == shown["X-Feature-Flags-Config"]


def test_the_flags_excerpt_is_the_seeds_file() -> None:
    [excerpt] = [b for b in blocks() if b.lang == "json" and '"flags"' in b.text]
    seeds = json.loads((REPO / "seeds" / "flags.json").read_text())["flags"]
    shown = json.loads(excerpt.text)["flags"]
    assert shown and all(seeds[key] == definition for key, definition in shown.items())


def test_the_demo_logs_are_text_with_one_line_per_request(demo: Demo) -> None:
    httpx.get(f"http://127.0.0.1:{demo.port}/api/logged-path", headers={"X-User-Id": "7"})
    deadline = time.monotonic() + 10
    while "GET /api/logged-path 200" not in demo.stderr.read_text():
        assert time.monotonic() < deadline, demo.stderr.read_text()
        time.sleep(0.02)  # the access log is written after the response
    text = demo.stderr.read_text()
    assert not any(line.startswith("{") for line in text.splitlines())  # no JSON lines
    assert "flagproxy ready: 4 flags" in text


def test_every_readme_command_works_against_make_run_as_written(demo: Demo) -> None:
    runnable_blocks = [b for b in blocks() if runnable(b)]
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", README, re.M))
    assert exports["FLAGPROXY_ADMIN_TOKEN"] == DEMO["admin"]["token"]
    assert exports["FLAGPROXY_WEBHOOKS_SECRET"] == DEMO["webhooks"]["secret"]
    env = clean_env({**exports, "FLAGPROXY_URL": f"http://127.0.0.1:{demo.port}"})
    ran = 0
    for block in runnable_blocks:
        for step in steps(block):
            where = f"README.md line {block.start}: {step.command}"
            command = on_port(step.command, demo.port).replace(".venv/bin/flagproxy", FLAGPROXY)
            if block.lang == "python":
                code = "\n".join(x.command for x in steps(block)[: steps(block).index(step)])
                last = f"print({command})" if step.expected else command
                done = subprocess.run(
                    [PYTHON, "-c", on_port(code, demo.port) + "\n" + last],
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            else:
                prior = [
                    x.command
                    for x in steps(block)[: steps(block).index(step)]
                    if re.match(r"^\w+=", x.command)
                ]
                script = "\n".join([*(on_port(p, demo.port) for p in prior), command])
                done = subprocess.run(
                    ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
                )
            ran += 1
            assert done.returncode == 0, (where, done.stdout, done.stderr)
            out = done.stdout.strip()
            for line in out.splitlines():
                try:
                    answer = json.loads(line)
                except ValueError:
                    continue
                assert not (isinstance(answer, dict) and "error" in answer), (where, line)
            if step.expected:
                try:
                    assert json.loads(out) == json.loads(step.expected), where
                except ValueError:
                    assert out.split() == step.expected.split(), (where, out)
    assert ran >= 12, ran  # the blocks were found and run, not skipped


if __name__ == "__main__":  # list what would run
    for b in blocks():
        if runnable(b):
            print(b.start, [s.command for s in steps(b)], file=sys.stderr)
