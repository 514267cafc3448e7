"""Argument types shared by the subcommands' parsers."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low`` (and <= ``high``), refused with a message saying so."""
    expected = f"expected a whole number >= {low}" if high is None else f"expected a whole number from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {expected}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text}: {expected}")
        return value

    return parse
