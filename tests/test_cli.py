"""The command line: every command of DESIGN.md is there; unbuilt ones say which issue brings them."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli

DESIGN_COMMANDS = ["data", "doctor", "train", "generate", "eval", "export", "create", "run", "serve",
                   "deploy", "pipeline", "report", "list", "show", "ps", "cp", "rm"]


def test_help_lists_every_command():
    done = run_cli("--help")
    assert done.returncode == 0
    for command in DESIGN_COMMANDS:
        assert f" {command} " in done.stdout, command


@pytest.mark.parametrize("command", [c for c in DESIGN_COMMANDS if c != "data"] + ["data inspect"])
def test_every_command_has_help(command):
    done = run_cli(*command.split(), "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: tunesmith" in done.stdout and "--config" in done.stdout


def test_usage_error_exits_2_without_traceback():
    done = run_cli("run")  # NAME missing
    assert done.returncode == 2 and "Missing argument" in done.stderr and "Traceback" not in done.stderr
