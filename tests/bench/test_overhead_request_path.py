"""The request path made cheaper for `bench overhead` keeps its semantics: the same errors in the
same order, the same JSON in every chunk, and the bench's step accounting takes no sides."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from tokenfactory.bench.overhead_bench import _two_steps_s
from tokenfactory.engine.config import EngineConfig
from tokenfactory.gateway.app import build_app
from tokenfactory.gateway.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    Usage,
)
from tokenfactory.gateway.serving import _event, _model_event

KEY = "sk-overhead-test"


@pytest.fixture(scope="module")
def http(tiny_model_dir) -> TestClient:
    """The real app, its lifespan not run: every request here is refused before any engine is needed."""
    config = EngineConfig.from_pretrained(tiny_model_dir, served_model_name="tiny")
    return TestClient(build_app(config, api_keys=[KEY]))


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_bad_key_is_a_401_before_the_body_is_read(http, path):
    error = error_of(http.post(path, content=b"{not json", headers={"Authorization": "Bearer wrong"}), 401)
    assert error["code"] == "invalid_api_key"


def test_an_unexpected_error_is_a_500_in_the_openai_format(http):
    # The app's lifespan has not run here, so a well-formed request finds no served model set up.
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert error_of(response, 500)["type"] == "server_error"


@pytest.mark.parametrize(("body", "content_type", "says", "param"), [
    (b'{"model": "tiny", "prompt": [1, 2', "application/json", "could not parse the JSON body", None),
    (b'["not", "an", "object"]', "application/json", "must be a JSON object", None),
    (b'{"model": "tiny", "prompt": "hi"}', "text/plain", "must be a JSON object", None),
    (b'{"model": "tiny", "prompt": "hi", "temperature": -1}', "application/json", "temperature", "temperature"),
    (b'{"model": "tiny", "prompt": "hi", "n": "many"}', "application/json; charset=utf-8", "n:", "n"),
    (b'{"prompt": "hi"}', "application/json", "model", "model"),
])
def test_bad_bodies_are_400s_naming_the_field(http, body, content_type, says, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": content_type}
    error = error_of(http.post("/v1/completions", content=body, headers=headers), 400)
    assert says in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_chat_messages_of_the_wrong_type_name_messages(http):
    body = {"model": "tiny", "messages": "hello"}
    error = error_of(http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}), 400)
    assert error["param"] == "messages"


@pytest.mark.parametrize("chunk", [
    CompletionResponse(id="cmpl-1", created=7, model="m", service_tier="flex",
                       choices=[CompletionChoice(index=0, text="h\u00e9llo \u4e16\u754c \"q\"\n")]),
    ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", service_tier="default",
                        choices=[ChatChunkChoice(index=1, delta=DeltaMessage(role="assistant", content=""))]),
    ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", choices=[],
                        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5, cost_usd=0.25)),
])
@pytest.mark.parametrize("exclude", [None, {"usage"}])
def test_chunks_serialised_by_pydantic_core_are_the_same_json(chunk, exclude):
    fast, plain = _model_event(chunk, exclude), _event(chunk.model_dump(exclude=exclude))
    assert fast.startswith("data: {") and fast.endswith("}\n\n")
    assert json.loads(fast.removeprefix("data: ")) == json.loads(plain.removeprefix("data: "))
    assert fast == plain  # key order, separators and unescaped text too


def test_two_steps_are_read_only_when_no_other_step_ran():
    before = [(10, 1.0), (4, 0.5)]
    assert _two_steps_s(before, [(12, 1.25), (4, 0.5)]) == pytest.approx(0.25)
    assert _two_steps_s(before, [(11, 1.1), (5, 0.6)]) == pytest.approx(0.2)  # summed over engines
    assert _two_steps_s(before, [(11, 1.1), (4, 0.5)]) is None  # the decode step not taken yet
    assert _two_steps_s(before, [(13, 1.3), (4, 0.5)]) is None  # another request's step in between


def test_other_methods_on_the_generation_routes_go_through_fastapi(http):
    assert http.get("/v1/completions").status_code == 405


def test_a_middleware_added_to_the_app_wraps_the_generation_routes_too(tiny_model_dir):
    seen: list[str] = []

    class Seen:
        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http":
                seen.append(scope["path"])
            await self.app(scope, receive, send)

    app = build_app(EngineConfig.from_pretrained(tiny_model_dir, served_model_name="tiny"), api_keys=[KEY])
    app.add_middleware(Seen)
    response = TestClient(app).post("/v1/completions", content=b"{}", headers={"Authorization": "Bearer wrong"})
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert seen == ["/v1/completions"]
