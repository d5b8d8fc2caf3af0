"""Shared fixtures: checkpoints built once per test session in temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import make_checkpoint
from tokenfactory.engine.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny model (Llama, 4 layers, ChatML tokenizer), written into a temp cache."""
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama checkpoint saved by transformers."""
    return make_checkpoint(tmp_path_factory.mktemp("llama"), arch="llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Qwen2 checkpoint (q/k/v biases, tied embeddings) saved by transformers."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), arch="qwen2")
