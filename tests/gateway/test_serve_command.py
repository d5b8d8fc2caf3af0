"""`tokenfactory serve` as a user runs it: flags become the engine config, SIGTERM stops it all."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.gateway.live_server import free_port, wait_until_up
from tokenfactory.cli import build_parser, serve_config
from tokenfactory.engine.tiny import TINY_MODEL_NAME


def test_serve_flags_become_the_engine_config(tiny_model_dir):
    args = build_parser().parse_args([
        "serve", "--model", str(tiny_model_dir), "--served-model-name", "mine", "--block-size", "32",
        "--num-blocks", "100", "--max-num-seqs", "4", "--max-num-batched-tokens", "256", "--max-model-len", "300",
        "--api-key", "a", "--api-key", "b",
    ])
    config = serve_config(args)
    assert config.name == "mine" and config.context_len == 300
    assert (config.cache.block_size, config.cache.num_blocks) == (32, 100)
    assert (config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens) == (4, 256)
    assert args.api_key == ["a", "b"] and config.device == "cpu" and config.dtype == "float32"


def test_serve_without_a_model_serves_the_tiny_model(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENFACTORY_HOME", str(tmp_path))
    config = serve_config(build_parser().parse_args(["serve"]))
    assert config.name == TINY_MODEL_NAME and Path(config.model_path).is_relative_to(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the engine process through /proc")
def test_serve_answers_and_sigterm_stops_the_engine_process(tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfactory.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--served-model-name", "tiny", "--num-blocks", "64", "--max-model-len", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(proc, url, timeout_s=90)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()["usage"]["completion_tokens"] == 3
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children, "the engine runs in its own process"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn shuts down gracefully, then re-raises the signal it caught, as a shell expects.
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in output
    assert f"http://127.0.0.1:{port}" in output and "'tiny'" in output
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline")
        assert not cmdline.exists() or "spawn_main" not in cmdline.read_text(), "the engine outlived the server"
