"""The gateway as an OpenAI client sees it: a live server on the tiny model, driven by the SDK."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.gateway.live_server import metric

PROMPT = [{"role": "user", "content": "Tell me about token factories."}]


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.api_key, max_retries=0, timeout=60)


def chat(client, gateway, **kwargs):
    kwargs.setdefault("messages", PROMPT)
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=gateway.model, **kwargs)


def test_models_lists_the_served_model(client, gateway):
    models = client.models.list()
    assert [m.id for m in models.data] == [gateway.model]


def test_chat_completion_has_openai_shape(client, gateway):
    resp = chat(client, gateway, temperature=0)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == gateway.model
    [choice] = resp.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    assert resp.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_equals_full_response_and_ends_with_usage(client, gateway):
    full = chat(client, gateway, temperature=0, max_tokens=12)
    chunks = list(chat(client, gateway, temperature=0, max_tokens=12, stream=True,
                       stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, usage_chunk = chunks
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == full.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12
    assert all(c.usage is None for c in content_chunks)


def test_completions_accept_every_prompt_form(client, gateway):
    ids = [5, 17, 300, 42]
    cases = [("hello there", 1), (["one", "two"], 2), (ids, 1), ([ids, ids[:2]], 2)]
    for prompt, num_choices in cases:
        resp = client.completions.create(model=gateway.model, prompt=prompt, max_tokens=3, temperature=0)
        assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
        assert [c.index for c in resp.choices] == list(range(num_choices))
        assert resp.usage.completion_tokens == 3 * num_choices


def test_completions_stream_and_echo(client, gateway):
    full = client.completions.create(model=gateway.model, prompt="The factory", max_tokens=6, temperature=0)
    echoed = client.completions.create(model=gateway.model, prompt="The factory", max_tokens=6, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "The factory" + full.choices[0].text
    chunks = list(client.completions.create(model=gateway.model, prompt="The factory", max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_string_cuts_the_text(client, gateway):
    full = chat(client, gateway, temperature=0, max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    resp = chat(client, gateway, temperature=0, max_tokens=16, stop=[stop, "never-seen-stop"])
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason == "stop"
    chunks = list(chat(client, gateway, temperature=0, max_tokens=16, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_same_seed_same_text(client, gateway):
    texts = [chat(client, gateway, temperature=1.0, seed=s, max_tokens=16).choices[0].message.content
             for s in (7, 7, 8)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_n_choices_use_consecutive_seeds(client, gateway):
    resp = chat(client, gateway, n=3, temperature=1.0, seed=11, max_tokens=10, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    single = chat(client, gateway, temperature=1.0, seed=12, max_tokens=10, extra_body={"ignore_eos": True})
    assert resp.choices[1].message.content == single.choices[0].message.content
    assert len({c.message.content for c in resp.choices}) > 1
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens  # the shared prompt counts once
    assert resp.usage.completion_tokens == 30
    streamed = list(chat(client, gateway, n=2, temperature=0, max_tokens=5, stream=True))
    finished = sorted(c.choices[0].index for c in streamed if c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_chat_logprobs(client, gateway):
    resp = chat(client, gateway, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 6
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        tops = [t.logprob for t in tok.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert tok.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy picks the most likely
    assert "".join(t.token for t in content) == resp.choices[0].message.content


def test_completion_logprobs(client, gateway):
    resp = client.completions.create(model=gateway.model, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == sorted(lp.text_offset)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)


def test_repeated_long_prompt_hits_the_prefix_cache(client, gateway):
    long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(150))}]
    first = chat(client, gateway, messages=long_prompt, max_tokens=2, temperature=0)
    second = chat(client, gateway, messages=long_prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 64
    assert second.usage.prompt_tokens_details.cached_tokens >= 64


# ---------------------------------------------------------------- errors


def post(gateway, path: str, content: bytes | None = None, json=None, key: str | None = "default"):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {gateway.api_key if key == 'default' else key}"
    return httpx.post(f"{gateway.url}{path}", content=content, json=json, headers=headers, timeout=30)


def assert_openai_error(resp: httpx.Response, status: int, type_: str = "invalid_request_error") -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["message"]
    return error


def test_malformed_json_is_a_400(gateway):
    error = assert_openai_error(post(gateway, "/v1/chat/completions", content=b'{"model": "tiny", "messages": ['), 400)
    assert "JSON" in error["message"]
    error = assert_openai_error(post(gateway, "/v1/completions", json=["not", "an", "object"]), 400)
    assert "JSON object" in error["message"]


def test_wrong_types_are_a_400(gateway):
    body = {"model": gateway.model, "messages": "hello", "max_tokens": 4}
    error = assert_openai_error(post(gateway, "/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages"
    body = {"model": gateway.model, "messages": PROMPT, "max_tokens": "many"}
    assert_openai_error(post(gateway, "/v1/chat/completions", json=body), 400)
    body = {"model": gateway.model, "prompt": "hi", "temperature": -1}
    assert_openai_error(post(gateway, "/v1/completions", json=body), 400)


def test_unknown_fields_are_ignored(gateway):
    body = {"model": gateway.model, "prompt": "hi", "max_tokens": 2, "frequency_penalty": 0, "made_up": {"x": 1}}
    assert post(gateway, "/v1/completions", json=body).status_code == 200


def test_prompt_past_the_context_window_is_a_400(client, gateway):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=gateway.model, prompt=[7] * 500, max_tokens=20)
    message = err.value.body["message"]
    assert "512" in message and "500" in message and "20" in message
    assert err.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"


def test_missing_or_wrong_api_key_is_a_401(gateway):
    body = {"model": gateway.model, "prompt": "hi", "max_tokens": 2}
    assert_openai_error(post(gateway, "/v1/completions", json=body, key=None), 401)
    assert_openai_error(post(gateway, "/v1/completions", json=body, key="sk-wrong"), 401)
    bad = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---------------------------------------------------------------- load


def wait_idle(gateway, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        engine = gateway.health().json()["engine"]
        if engine["num_running"] == 0 and engine["num_waiting"] == 0:
            return engine
        assert time.monotonic() < deadline, engine
        time.sleep(0.05)


def test_client_disconnect_aborts_and_frees_kv_blocks(gateway):
    steps_before = wait_idle(gateway)["num_steps"]
    body = {"model": gateway.model, "messages": PROMPT, "max_tokens": 480, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {gateway.api_key}"}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
    assert received  # the stream had started when the client walked away
    engine = wait_idle(gateway)
    assert engine["num_free_blocks"] == engine["num_total_blocks"]
    # Had the request run on, it would have taken at least 480 engine steps.
    assert engine["num_steps"] - steps_before < 300


def test_client_leaving_a_full_response_request_aborts_it(gateway):
    wait_idle(gateway)

    def requests(outcome: str) -> float:
        try:
            return metric(gateway, "tokenfactory_requests_total", model=gateway.model, tier="default", outcome=outcome)
        except KeyError:  # none yet
            return 0.0

    aborted, completed = requests("aborted"), requests("completed")
    body = {"model": gateway.model, "messages": PROMPT, "max_tokens": 480, "ignore_eos": True}
    headers = {"authorization": f"Bearer {gateway.api_key}"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 480 tokens are ready
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=0.5)
    engine = wait_idle(gateway)
    assert engine["num_free_blocks"] == engine["num_total_blocks"]
    # Aborted, not run to its end (counting steps would depend on how fast the engine runs: the
    # client's 0.5 s and the gateway's disconnect poll are 200-400 steps of the tiny model).
    assert requests("aborted") == aborted + 1 and requests("completed") == completed


def test_64_concurrent_streams_all_complete(gateway):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=gateway.model, messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=8, temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        finish, usage = None, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        return finish, usage.completion_tokens

    async def run_all() -> list:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.api_key,
                                      max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run_all())
    assert results == [("length", 8)] * 64
    engine = wait_idle(gateway)
    assert engine["num_free_blocks"] == engine["num_total_blocks"]
