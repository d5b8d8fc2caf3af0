"""A live gateway on loopback: uvicorn in a thread, the engine in its own process, a real port."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tokenfactory.bench.serve_bench import free_port
from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.gateway.app import build_app
from tokenfactory.runtime.client import AsyncEngineClient
from tokenfactory.runtime.pool import ServedModel

MODEL_NAME = "tiny"
CONTEXT_LEN = 512
API_KEY = "sk-test-key"


def gateway_config(model_dir: Path) -> EngineConfig:
    return EngineConfig.from_pretrained(
        model_dir,
        served_model_name=MODEL_NAME,
        max_model_len=CONTEXT_LEN,
        cache=CacheConfig(block_size=16, num_blocks=1024),
        scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=1024),
    )


def wait_until_up(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Poll a `tokenfactory serve` subprocess's /health until it answers 200; fail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


class LiveServer:
    """Serve `config` on a free loopback port until `stop()`."""

    def __init__(self, config: EngineConfig | Sequence[ServedModel], api_keys: Sequence[str] = (),
                 **app_options: Any) -> None:
        """`config`: one model on a fresh engine process, or several served models with their own
        workers (`model` and `worker` are then the first one's). `app_options` go to `build_app`
        (tiers, db_path, admin_key, clock)."""
        models = [ServedModel(config, AsyncEngineClient(config))] if isinstance(config, EngineConfig) else config
        self.model, self.worker = models[0].name, models[0].worker
        self.api_key = api_keys[0] if api_keys else "unused"
        self.app = build_app(models, api_keys=api_keys, **app_options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, name="live-gateway", daemon=True)

    def start(self, timeout_s: float = 120.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)


def metric(server, name: str, **labels: str) -> float:
    """One sample of the live server's /metrics, by name and exact labels."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError(f"{name}{labels} not in /metrics")
