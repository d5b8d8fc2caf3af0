"""GET /metrics and the ledger's energy column, as an operator and a client see them."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.live_server import API_KEY, MODEL_NAME, LiveServer, gateway_config
from tokenfactory.meter.ledger import read_entries


@pytest.fixture(scope="module")
def metered(tiny_model_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("metered") / "factory.db"
    server = LiveServer(gateway_config(tiny_model_dir), api_keys=[API_KEY], db_path=db).start()
    server.db = db
    yield server
    server.stop()


def samples(server) -> dict[tuple[str, frozenset], float]:
    resp = httpx.get(f"{server.url}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def test_metrics_count_requests_tokens_latency_revenue_and_energy_by_tier(metered):
    client = openai.OpenAI(base_url=f"{metered.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    resp = client.completions.create(model=MODEL_NAME, prompt="hello factory", max_tokens=5, n=2,
                                     extra_body={"ignore_eos": True, "service_tier": "flex"})
    deadline = time.monotonic() + 10
    while not (rows := [r for r in read_entries(metered.db) if r.request_id == resp.id]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    row = rows[0]
    assert row.energy_j is not None and row.energy_j > 0  # both choices' steps, attributed by tokens

    m = samples(metered)
    flex = frozenset({("model", MODEL_NAME), ("tier", "flex")})
    assert m[("tokenfactory_requests_total", flex | {("outcome", "completed")})] == 1
    assert m[("tokenfactory_tokens_total", flex | {("kind", "completion")})] == 10
    assert m[("tokenfactory_request_duration_seconds_count", flex)] == 1
    assert m[("tokenfactory_time_to_first_token_seconds_count", flex)] == 1
    assert m[("tokenfactory_revenue_usd_total", flex)] == pytest.approx(row.cost_usd)
    assert m[("tokenfactory_request_energy_joules_total", flex)] == pytest.approx(row.energy_j)
    assert m[("tokenfactory_energy_cost_usd_total", flex)] > 0
    worker = frozenset({("model", MODEL_NAME), ("worker", "0")})
    assert m[("tokenfactory_requests_running", worker)] == 0
    assert 0 <= m[("tokenfactory_kv_cache_usage_ratio", worker)] <= 1
    modeled = worker | {("source", "modeled")}  # no GPU here: the CPU is modeled
    assert m[("tokenfactory_power_watts", modeled)] > 0
    assert m[("tokenfactory_step_energy_joules", modeled)] >= row.energy_j * 0.999
    assert 0 <= m[("tokenfactory_prefix_cache_hit_rate", frozenset())] <= 1
