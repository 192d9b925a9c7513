"""argparse types the subcommands share."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: a positive integer, else argparse's one-line usage error."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value
