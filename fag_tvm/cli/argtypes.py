"""argparse value types shared by the subcommands: a bad value is argparse's one-line usage error (exit 2)
naming the option, never a NumPy warning or a raw exception from deep inside a run."""
from __future__ import annotations

import argparse
from typing import Callable


def int_at_least(lo: int) -> Callable[[str], int]:
    """An int option that must be >= lo."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"int >= {lo}"
    return parse
