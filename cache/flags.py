"""Command-line flags, the same way in every command: a bad flag is one line and exit 2, before
any work, and a number flag names its allowed range. Every entry point (extract, cache, heads.*,
search) builds its parser from here, so the rules cannot drift apart between copies.
(It lives in `cache`, the bottom of the layering, only so that every stage can import it.)"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`prog: error: ...`, exit 2) without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


@dataclass(frozen=True)
class Valid:
    """The values a number flag accepts: from `low` to `high`, each end included unless marked
    open; NaN and infinities never."""
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def contains(self, value) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        high = "inf)" if math.isinf(self.high) else f"{_exact(self.high)}{')' if self.high_open else ']'}"
        return f"{'(' if self.low_open else '['}{_exact(self.low)}, {high}"


def _exact(bound) -> str:
    # an integer bound printed whole: 2**63 - 1 as %g would read 9.22337e+18, which is not the bound
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def parse_number(text: str, *, kind, valid: Valid):
    """`text` as an int or float inside `valid`, or argparse.ArgumentTypeError naming the range."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}; "
                                         f"allowed: {valid.describe()}") from None
    if not valid.contains(value):
        raise argparse.ArgumentTypeError(f"{text} is outside {valid.describe()} (the allowed range)")
    return value


def number_type(kind, valid: Valid):
    """argparse `type=` for a number flag: `kind` (int or float) inside `valid`."""
    def parse(text: str):
        return parse_number(text, kind=kind, valid=valid)
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse
