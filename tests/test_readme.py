"""The README's examples run as written: every `polymodal ...` line of its bash blocks parses, the
runnable ones run (in a scratch folder, in document order), and every Python block executes."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from polymodal.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)
# Lines of the set-up commands (installs) and of the GGUF example (covered by tests/test_cli.py) are
# not run here; neither is the synopsis, whose [optional] arguments and a|b choices are notation.
NOT_RUN = ("pip ", "apt-get ", "GGUF", "$GGUF")


def _blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def _commands(code: str) -> list[list[str]]:
    """The shell commands of a bash block: comments dropped, `&&` chains split."""
    commands = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in words + ["&&"]:
            if word == "&&":
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def _is_synopsis(command: list[str]) -> bool:
    return any(w.startswith("[") or "|" in w or w.isupper() for w in command[1:])


def test_every_polymodal_line_parses():
    parser = build_parser()
    seen = 0
    for kind, code in _blocks():
        for command in _commands(code) if kind == "bash" else []:
            if command[0] == "polymodal" and not _is_synopsis(command):
                parser.parse_args(command[1:])  # argparse exits (a failure here) on a bad line
                seen += 1
    assert seen >= 10


@pytest.fixture
def scratch_registry():
    """The README registers an example family; take it out again afterwards."""
    from polymodal.models.registry import unregister

    yield
    unregister("scale")


def test_the_examples_run_in_order(tmp_path, monkeypatch, scratch_registry):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for kind, code in _blocks():
        if kind == "python":
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
            continue
        for command in _commands(code):
            if any(command[0].startswith(skip) or skip in " ".join(command) for skip in NOT_RUN):
                continue
            if command[0] == "polymodal" and not _is_synopsis(command) and command[1] != "quickstart":
                assert main(command[1:]) == 0, command
            elif command[:2] == ["python", "-c"]:
                subprocess.run([sys.executable, *command[1:]], check=True)
    assert (tmp_path / "runs" / "lm-tiny" / "final").is_dir()


@pytest.mark.parametrize("path", ["configs/quickstart", "docs/notes/quickstart.md", "benchmarks/RESULTS.md"])
def test_linked_files_exist(path):
    assert (ROOT / path).exists()
