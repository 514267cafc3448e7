"""COURSEZOO_LOG_LEVEL: a level's name in any case, or unset; anything else is the command's usage error.
And the dispatcher's own errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def coursezoo(*args: str, level: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COURSEZOO_LOG_LEVEL"}
    if level is not None:
        env["COURSEZOO_LOG_LEVEL"] = level
    return subprocess.run([sys.executable, "-m", "coursezoo", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("level", [None, "", " ", "info", "DEBUG", "Warning", "warn"])
def test_a_level_or_nothing_is_accepted(level: str | None) -> None:
    """Empty is unset: compose passes the variable through empty when .env leaves it out."""
    assert coursezoo("serve", "--help", level=level).returncode == 0


@pytest.mark.parametrize("level", ["verbose", "10", "loud"])
def test_anything_else_stops_every_command_in_one_line(level: str) -> None:
    """Before, a traceback from logging (ValueError: Unknown level), --help included: a server crash-looped."""
    for command, status in (("serve", 2), ("batch", 1)):  # each command's usage error: batch's 2 is "some inputs"
        done = coursezoo(command, "--help", level=level)
        assert done.returncode == status
        assert done.stderr.endswith(f"coursezoo {command}: error: COURSEZOO_LOG_LEVEL={level!r}: expected one of "
                                    "NOTSET, DEBUG, INFO, WARN, WARNING, ERROR, CRITICAL, FATAL (any case), or unset "
                                    "for WARNING\n")
        assert "Traceback" not in done.stderr


def test_an_unknown_command_is_named_and_the_version_printed() -> None:
    done = coursezoo("serv", level=None)
    assert done.returncode == 2 and done.stderr.startswith("coursezoo: unknown command 'serv'\nusage:")
    version = coursezoo("--version", level=None)
    assert version.returncode == 0 and version.stdout.startswith("coursezoo ")
