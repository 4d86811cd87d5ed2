"""README.md's code blocks run as written, on the shipped demo model, on a CPU.

Each ```python block runs as its own script; from each ```bash / ```sh / ```console block, the lines that
call a tool (`offload-...`, in console blocks after the `$ ` prompt) run in order as one bash script, with
the block's shell assignments (`DEMO=$(...)`) kept before them, so other commands in a block (pip, pytest)
never run here. Every block runs in a subprocess, in a fresh temporary directory, with this checkout first
on PYTHONPATH and this interpreter's scripts first on PATH. A block preceded by
`<!-- readme-test: skip -->` (the install and the interactive chat) is not run.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = "<!-- readme-test: skip -->"
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
SHELL = {"bash", "sh", "console", "shell"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
TIMEOUT = 900  # seconds per block: a busy 2-core CI machine loads torch and transformers slowly


def blocks() -> list[tuple[int, str, str]]:
    """(line number, language, code) of every fenced block not marked to skip."""
    text = README.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        if before and before[-1].strip() == SKIP:
            continue
        found.append((text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)))
    return found


def shell_script(lang: str, code: str) -> str:
    lines = []
    for line in code.splitlines():
        if lang == "console":
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        line = line.strip()
        if line.startswith("offload-") or ASSIGNMENT.match(line):
            lines.append(line)
    return "\n".join(lines)


def runnable() -> list:
    cases = []
    for lineno, lang, code in blocks():
        if lang == "python":
            cases.append(pytest.param("python", code, id=f"README.md:{lineno}:python"))
        elif lang in SHELL:
            script = shell_script(lang, code)
            if any(line.startswith("offload-") for line in script.splitlines()):
                cases.append(pytest.param("bash", script, id=f"README.md:{lineno}:{lang}"))
    return cases


def test_readme_has_runnable_blocks():
    kinds = [p.values[0] for p in runnable()]
    assert "python" in kinds and "bash" in kinds, f"README.md lost its runnable examples: {kinds}"


@pytest.mark.parametrize("kind, code", runnable())
def test_readme_block_runs(kind, code, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    if kind == "python":
        (tmp_path / "block.py").write_text(code)
        cmd = [sys.executable, "block.py"]
    else:
        (tmp_path / "block.sh").write_text("set -euo pipefail\n" + code + "\n")
        cmd = ["bash", "block.sh"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (f"README block failed (exit {r.returncode}):\n{code}\n--- stdout\n{r.stdout[-3000:]}"
                               f"\n--- stderr\n{r.stderr[-3000:]}")
