"""Fixtures for the gateway tests: one live server per module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway.live_server import API_KEY, LiveServer, gateway_config


@pytest.fixture(scope="module")
def gateway(tiny_model_dir: Path):
    """One live server per test module (engine startup is the slow part), keyed with API_KEY."""
    server = LiveServer(gateway_config(tiny_model_dir), api_keys=[API_KEY]).start()
    yield server
    server.stop()
