"""The README's offline examples run as written from a fresh checkout (the files they name exist)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGPROXY = Path(sys.executable).parent / "flagproxy"


def readme_commands(program: str) -> list[list[str]]:
    """Every ``program ...`` line of the README's shell blocks, comments dropped."""
    commands = []
    in_shell = False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_shell = line.strip() in ("```sh", "```bash")
            continue
        if in_shell and line.startswith(program + " "):
            commands.append(shlex.split(line, comments=True))
    return commands


def test_the_eval_examples_run_and_answer_every_key() -> None:
    commands = readme_commands("flagproxy eval")
    assert any("--keys-file" in c for c in commands), commands
    for command in commands:
        done = subprocess.run(
            [str(FLAGPROXY), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (command, done.stderr)
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        if "--keys-file" in command:
            keys_file = ROOT / command[command.index("--keys-file") + 1]
            inputs = [line for line in keys_file.read_text().splitlines() if line.strip()]
            assert len(lines) == len(inputs) >= 3  # one answer per key, in order
        # --key prints the header value itself, --keys-file one {"key", "flags"} a line
        assert all("starter_pack_price" in answer.get("flags", answer) for answer in lines), lines
