"""Fixtures for the runtime tests: one event loop per module for a long-lived client or pool."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.loop_thread import LoopThread


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()
