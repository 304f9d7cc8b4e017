"""Shared test fixtures."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny shapes on the 2 shared CI cores: one torch thread avoids OpenMP oversubscription stalls (10-100x
    slower otherwise); the previous setting is restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
