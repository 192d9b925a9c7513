"""Torch's thread count, held at one while the server trains or scores."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """Server-side training and scoring on one thread, as client tasks run: the same numbers
    whichever strategy ran first in this process and on every backend (and no fight for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
