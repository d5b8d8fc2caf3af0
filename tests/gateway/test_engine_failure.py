"""When the engine process dies, clients get a clear error at once, never a hang."""

from __future__ import annotations

import os
import signal

import openai
import pytest

from tests.gateway.live_server import LiveServer, gateway_config


@pytest.fixture
def doomed_gateway(tiny_model_dir):
    server = LiveServer(gateway_config(tiny_model_dir)).start()
    yield server
    server.stop()


def test_dead_engine_fails_streams_and_turns_requests_into_503(doomed_gateway):
    gateway = doomed_gateway
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model=gateway.model, messages=[{"role": "user", "content": "hi"}], max_tokens=480, stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))  # the request is running in the engine
    os.kill(gateway.worker.pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="engine"):
        for _ in stream:
            pass
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=gateway.model, prompt="hi", max_tokens=2)
    assert err.value.status_code == 503
    assert gateway.health().status_code == 503
