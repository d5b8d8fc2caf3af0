"""Tiers, keys and the ledger as a client sees them: a live server with a factory database."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.gateway.live_server import LiveServer, gateway_config
from tokenfactory.control.tiers import TokenUsage, parse_factory_config, price_usage
from tokenfactory.meter.keys import KeyStore
from tokenfactory.meter.ledger import LedgerEntry, read_entries

FACTORY_YAML = """
tiers:
  flex: {prices: {default: {input: 0.5, cached_input: 0.1, output: 2.0}}, priority: -10, sheddable: true}
  default: {prices: {default: {input: 1.0, cached_input: 0.25, output: 4.0}}}
  priority: {prices: {default: {input: 2.0, cached_input: 0.5, output: 8.0}}, priority: 10}
  free: {prices: {default: {}}, priority: -20, token_quota: 30, quota_period_s: 86400}
"""
ADMIN_KEY = "admin-secret"
STATIC_KEY = "sk-plain"
PROMPT = [{"role": "user", "content": "Tell me about token factories."}]


@pytest.fixture(scope="module")
def factory(tiny_model_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("factory") / "factory.db"
    tiers = parse_factory_config(FACTORY_YAML)
    server = LiveServer(gateway_config(tiny_model_dir), api_keys=[STATIC_KEY], tiers=tiers, db_path=db,
                        admin_key=ADMIN_KEY).start()
    server.db, server.tiers = db, tiers
    yield server
    server.stop()


def admin(factory, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{factory.url}{path}", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=30, **kwargs)


def new_key(factory, tenant: str, **body) -> str:
    resp = admin(factory, "POST", "/admin/keys", json={"tenant": tenant, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()["key"]


def client_for(factory, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{factory.url}/v1", api_key=key, max_retries=0, timeout=60)


def ledger_entry(factory, request_id: str, timeout_s: float = 10.0) -> LedgerEntry:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for r in read_entries(factory.db) if r.request_id == request_id]
        if rows or time.monotonic() > deadline:
            assert len(rows) == 1, rows
            return rows[0]
        time.sleep(0.05)


def assert_ledger_matches(factory, request_id: str, usage, tier: str, tenant: str) -> None:
    row = ledger_entry(factory, request_id)
    assert (row.tenant, row.tier, row.model, row.outcome) == (tenant, tier, factory.model, "completed")
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
        usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens)
    tokens = TokenUsage(row.prompt_tokens, row.cached_tokens, row.completion_tokens)
    assert row.cost_usd == pytest.approx(price_usage(factory.tiers.tiers[tier], factory.model, tokens))
    assert row.cost_usd > 0 and 0 <= row.ttft_s <= row.duration_s
    assert row.energy_j is not None and row.energy_j > 0  # attributed from the engine's steps


def test_service_tier_is_echoed_and_every_request_is_in_the_ledger_once(factory):
    client = client_for(factory, new_key(factory, "acme"))
    full = client.chat.completions.create(model=factory.model, messages=PROMPT, max_tokens=6, n=2,
                                          service_tier="priority")
    assert full.service_tier == "priority"
    assert_ledger_matches(factory, full.id, full.usage, "priority", "acme")
    chunks = list(client.chat.completions.create(model=factory.model, messages=PROMPT, max_tokens=5, n=3,
                                                 service_tier="flex", stream=True,
                                                 stream_options={"include_usage": True}))
    assert {c.service_tier for c in chunks} == {"flex"}
    assert chunks[-1].usage.completion_tokens == 15
    assert_ledger_matches(factory, chunks[0].id, chunks[-1].usage, "flex", "acme")
    auto = client.completions.create(model=factory.model, prompt="hello", max_tokens=3,
                                     extra_body={"service_tier": "auto"})
    assert auto.service_tier == "default"
    assert_ledger_matches(factory, auto.id, auto.usage, "default", "acme")
    streamed = list(client.completions.create(model=factory.model, prompt=["a", "b"], max_tokens=2, stream=True,
                                              stream_options={"include_usage": True}))
    assert {c.service_tier for c in streamed} == {"default"}
    assert_ledger_matches(factory, streamed[0].id, streamed[-1].usage, "default", "acme")


def test_plain_command_line_keys_still_work(factory):
    resp = client_for(factory, STATIC_KEY).chat.completions.create(model=factory.model, messages=PROMPT, max_tokens=2)
    assert resp.service_tier == "default"
    assert ledger_entry(factory, resp.id).tenant == "default"


def test_a_tier_the_key_may_not_use_is_refused_not_upgraded(factory):
    client = client_for(factory, new_key(factory, "freeloader", tiers=["free"]))
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model=factory.model, messages=PROMPT, max_tokens=2, service_tier="priority")
    assert err.value.body["code"] == "tier_not_allowed" and err.value.body["param"] == "service_tier"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=factory.model, messages=PROMPT, max_tokens=2,
                                       extra_body={"service_tier": "platinum"})
    assert err.value.body["code"] == "invalid_service_tier"


def test_over_the_quota_is_a_429_with_retry_after(factory):
    client = client_for(factory, new_key(factory, "freeloader", tiers=["free"]))
    first = client.chat.completions.create(model=factory.model, messages=PROMPT, max_tokens=8)
    assert first.service_tier == "free" and first.usage.total_tokens > 30
    assert ledger_entry(factory, first.id).cost_usd == 0.0
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=factory.model, messages=PROMPT, max_tokens=8)
    assert err.value.body["code"] == "token_quota"
    assert 0 < int(err.value.response.headers["retry-after"]) <= 86400


def test_revoked_key_is_refused_at_once_and_keys_need_the_admin_key(factory):
    key = new_key(factory, "acme")
    client = client_for(factory, key)
    client.models.list()
    key_id = key.split("-")[1]
    assert key_id in [k["id"] for k in admin(factory, "GET", "/admin/keys").json()["data"]]
    assert KeyStore(factory.db).revoke(key_id)  # as `tokenfactory keys revoke` does, from another process
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert admin(factory, "DELETE", f"/admin/keys/{key_id}").status_code == 404  # already revoked
    wrong = httpx.get(f"{factory.url}/admin/keys", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def test_a_client_that_leaves_is_recorded_as_aborted(factory):
    key = new_key(factory, "leaver")
    body = {"model": factory.model, "messages": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{factory.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {key}"}) as r:
        received = [line for line, _ in zip(r.iter_lines(), range(6)) if line.startswith("data:")]
    request_id = json.loads(received[0][len("data:"):])["id"]
    row = ledger_entry(factory, request_id)
    assert row.outcome == "aborted" and row.tenant == "leaver"
    assert 0 < row.completion_tokens < 400
    with pytest.raises(httpx.ReadTimeout):  # a full-response request whose client gives up
        httpx.post(f"{factory.url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5,
                   headers={"authorization": f"Bearer {key}"})
    deadline = time.monotonic() + 10
    while not [r for r in read_entries(factory.db) if r.tenant == "leaver" and r.request_id != request_id]:
        assert time.monotonic() < deadline, "the abandoned full-response request never reached the ledger"
        time.sleep(0.05)
    [other] = [r for r in read_entries(factory.db) if r.tenant == "leaver" and r.request_id != request_id]
    assert other.outcome == "aborted" and other.completion_tokens < 400
