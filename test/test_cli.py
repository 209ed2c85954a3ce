"""The `bevplace-ros` command line answers --help for itself and every registered subcommand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bevplace_ros import cli


def _help(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "bevplace_ros.cli", *args, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_top_level_help_lists_available_commands():
    text = _help()
    for group, name, _ in cli._available():
        assert (group or name) in text


@pytest.mark.parametrize("group,name", [(g, n) for g, n, _ in cli._available()])
def test_each_subcommand_has_help(group, name):
    args = (group, name) if group else (name,)
    assert "usage: bevplace-ros" in _help(*args)


def test_unknown_command_fails_cleanly():
    result = subprocess.run([sys.executable, "-m", "bevplace_ros.cli", "no-such-command"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice" in result.stderr
