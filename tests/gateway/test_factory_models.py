"""A factory of several models behind one gateway: each model has its own pool, its own prices,
and its own failures; /v1/models, /health, /metrics and the governor see them all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest

from tests.gateway.live_server import API_KEY, LiveServer, metric
from tokenfactory.cli import build_parser, flags_model_spec, model_engine_config, model_worker, served_model_specs
from tokenfactory.control.router import RoundRobinRouter
from tokenfactory.control.tiers import ConfigError, ModelSpec, TokenUsage, parse_factory_config, price_usage
from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.meter.ledger import read_entries
from tokenfactory.runtime.client import AsyncEngineClient
from tokenfactory.runtime.pool import ServedModel, WorkerPool

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "factory.yaml")

TIERS = """
tiers:
  default:
    prices:
      default: {input: 1.0, cached_input: 0.5, output: 2.0}
      specialist: {input: 10.0, cached_input: 5.0, output: 20.0}
"""


def engine_config(model_dir, name: str) -> EngineConfig:
    return EngineConfig.from_pretrained(model_dir, served_model_name=name, max_model_len=256,
                                        cache=CacheConfig(block_size=16, num_blocks=128),
                                        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512))


@pytest.fixture(scope="module")
def factory(tiny_model_dir, llama_dir, tmp_path_factory):
    """`general`: the tiny model on two workers (round robin, restarted when they die);
    `specialist`: another checkpoint on one engine, priced ten times higher."""
    db = tmp_path_factory.mktemp("factory") / "factory.db"
    general = engine_config(tiny_model_dir, "general")
    specialist = engine_config(llama_dir, "specialist")
    models = [
        ServedModel(general, WorkerPool.local(general, 2, router="round_robin", restart_interval_s=0.5)),
        ServedModel(specialist, AsyncEngineClient(specialist)),
    ]
    server = LiveServer(models, api_keys=[API_KEY], tiers=parse_factory_config(TIERS), db_path=db).start()
    server.db = db
    server.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield server
    server.stop()


def health(server) -> dict[str, dict]:
    """/health's per-model blocks by model name."""
    return {m["model"]: m for m in server.health().json()["models"]}


def ledger_row(server, request_id: str):
    deadline = time.monotonic() + 10
    while not (rows := [r for r in read_entries(server.db) if r.request_id == request_id]):
        assert time.monotonic() < deadline, f"{request_id} is not in the ledger"
        time.sleep(0.05)
    return rows[0]


# ---------------------------------------------------------------- the config


def test_the_config_lists_models_with_their_pools_and_refuses_mistakes():
    with open(EXAMPLE) as f:
        example = parse_factory_config(f.read(), "examples/factory.yaml")
    general, specialist = example.models
    assert (general.served_name, general.num_workers, general.router) == ("general", 2, "kv")
    assert (specialist.served_name, specialist.num_workers, specialist.max_num_seqs) == ("specialist", 1, 32)
    default = example.tiers["default"]
    assert default.prices_for("specialist").output == 10 * default.prices_for("general").output

    split = parse_factory_config(TIERS + "models: [{path: tiny, prefill_workers: 1, decode_workers: 2}, "
                                 "{name: specialist, path: ckpt/llama/}]").models
    assert [m.served_name for m in split] == ["tokenfactory-tiny", "specialist"]
    assert split[0].num_workers == 3
    assert ModelSpec(path="ckpt/llama/").served_name == "llama"  # the folder's name, like --model

    mistakes = {
        "models: [{name: a}, {name: a}]": "same name: a",
        "models: [{name: a}]": "prices specialist, which the factory does not serve",
        "models: [{name: specialist, workers: 2, prefill_workers: 1, decode_workers: 1}]": "not both",
        "models: [{name: specialist, prefill_workers: 1}]": "both prefill_workers and decode_workers",
        "models: [{name: specialist, router: fastest}]": "router 'fastest'",
        "models: [{name: specialist, dtype: float8}]": "dtype 'float8'",
        "models: [{name: specialist, device: tpu}]": "device",
        "models: [{name: specialist, workers: 0}]": "workers",
        "models: [{name: specialist, wokers: 2}]": "wokers",
    }
    for models, message in mistakes.items():
        with pytest.raises(ConfigError, match=message):
            parse_factory_config(TIERS + models, "factory.yaml")


def test_serve_takes_the_models_from_the_config_or_one_from_the_flags(tmp_path, llama_dir):
    config = tmp_path / "factory.yaml"
    config.write_text(TIERS + f"models: [{{name: specialist, path: {os.path.relpath(llama_dir, tmp_path)}}}]")
    tiers = parse_factory_config(config.read_text())

    args = build_parser().parse_args(["serve", "--factory-config", str(config), "--port", "9000"])
    specs, base_dir = served_model_specs(args, tiers.models)
    engine = model_engine_config(specs[0], base_dir)  # a relative path starts from the config's folder
    assert engine.name == "specialist" and os.path.samefile(engine.model_path, llama_dir)

    # A per-model flag beside the config's models would be silently ignored: it is an error.
    args = build_parser().parse_args(["serve", "--factory-config", str(config), "--workers", "2", "--no-db"])
    with pytest.raises(SystemExit, match="--workers"):
        served_model_specs(args, tiers.models)

    # Without `models`, the flags describe a factory of one model, as before.
    args = build_parser().parse_args(["serve", "--model", str(llama_dir), "--prefill-workers", "1",
                                      "--decode-workers", "1"])
    specs, base_dir = served_model_specs(args, [])
    assert base_dir is None and specs[0].served_name == llama_dir.name and specs[0].num_workers == 2
    assert specs[0].disagg_min_prompt_tokens == 256
    with pytest.raises(SystemExit, match="workers"):
        flags_model_spec(build_parser().parse_args(["serve", "--workers", "0"]))

    # Each model gets its own workers, made (not started) from its spec.
    one = model_worker(ModelSpec(name="a"), engine)
    pool = model_worker(ModelSpec(name="b", workers=3, router="round_robin"), engine)
    split = model_worker(specs[0], engine)
    assert isinstance(one, AsyncEngineClient)
    assert isinstance(pool, WorkerPool) and len(pool.workers) == 3 and isinstance(pool.router, RoundRobinRouter)
    assert isinstance(split, WorkerPool) and split.num_prefill == 1 and split.disagg.min_prompt_tokens == 256


# ---------------------------------------------------------------- live


def test_models_are_listed_and_an_unknown_model_is_404_without_a_ledger_row(factory):
    assert sorted(m.id for m in factory.client.models.list().data) == ["general", "specialist"]
    rows_before = len(read_entries(factory.db))
    with pytest.raises(openai.NotFoundError) as err:
        factory.client.completions.create(model="generalist", prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_found" and err.value.body["param"] == "model"
    assert len(read_entries(factory.db)) == rows_before


def test_requests_land_in_their_own_pool_and_are_priced_per_model(factory):
    before = health(factory)
    ids = {}
    for model, count in (("general", 4), ("specialist", 3)):
        ids[model] = [factory.client.completions.create(model=model, prompt=f"request {i} for {model}",
                                                        max_tokens=4, extra_body={"ignore_eos": True}).id
                      for i in range(count)]
    after = health(factory)
    routed = [w["num_routed"] - b["num_routed"]
              for w, b in zip(after["general"]["workers"], before["general"]["workers"], strict=True)]
    assert routed == [2, 2]  # all four general requests went to general's own two workers
    specialist_steps = after["specialist"]["engine"]["num_steps"] - before["specialist"]["engine"]["num_steps"]
    assert specialist_steps >= 3 * 4  # its three requests stepped on its own engine

    tier = parse_factory_config(TIERS).tiers["default"]
    for model, request_ids in ids.items():
        for request_id in request_ids:
            row = ledger_row(factory, request_id)
            usage = TokenUsage(row.prompt_tokens, row.cached_tokens, row.completion_tokens)
            assert row.model == model and row.outcome == "completed" and row.completion_tokens == 4
            assert row.cost_usd == pytest.approx(price_usage(tier, model, usage)) and row.cost_usd > 0
    cost = {m: sum(ledger_row(factory, r).cost_usd for r in request_ids) / len(request_ids)
            for m, request_ids in ids.items()}
    assert cost["specialist"] > 5 * cost["general"]  # ten times the prices, similar prompts

    for model, request_ids in ids.items():
        assert metric(factory, "tokenfactory_requests_total", model=model, tier="default",
                      outcome="completed") >= len(request_ids)
    assert metric(factory, "tokenfactory_kv_cache_usage_ratio", model="general", worker="1") >= 0
    assert metric(factory, "tokenfactory_requests_running", model="specialist", worker="0") == 0
    factory.app.state.metering.admission.tick()  # a governor decision for the dashboard to show
    data = httpx.get(f"{factory.url}/dashboard/data", timeout=10).json()
    assert data["model"] == "general, specialist"
    # Workers named as /metrics names them: the model and the number within its pool.
    assert [(w["model"], w["worker"]) for w in data["workers"]] == [("general", 0), ("general", 1),
                                                                    ("specialist", 0)]


def test_the_power_governor_spans_every_pool(factory):
    decision = factory.app.state.metering.admission.tick()
    assert [w.worker_id for w in decision.workers] == [0, 1, 2]  # general's two engines, then specialist's
    assert decision.budget_w > 0


async def stream_text(url: str, model: str, prompt: str, started: asyncio.Event | None = None) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, chunks = [], 0
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                text.append(event["choices"][0]["text"])
                chunks += 1
                if started is not None and chunks >= 3:
                    started.set()
    return "".join(text)


def test_a_killed_worker_in_one_pool_does_not_disturb_the_other(factory):
    streams = [("general", "the first general stream"), ("general", "the second general stream"),
               ("specialist", "the specialist stream")]

    async def run() -> tuple[list[str], list[str]]:
        reference = [await stream_text(factory.url, model, prompt) for model, prompt in streams]
        started = [asyncio.Event() for _ in streams]
        tasks = [asyncio.create_task(stream_text(factory.url, model, prompt, started[i]))
                 for i, (model, prompt) in enumerate(streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)  # all three under way
        pool = factory.app.state.pools.models["general"].worker
        os.kill(pool.workers[1].info.pid, signal.SIGKILL)  # round robin put one general stream there
        return reference, await asyncio.wait_for(asyncio.gather(*tasks), 120)

    pool = factory.app.state.pools.models["general"].worker
    migrations_before = pool.num_migrations
    reference, results = asyncio.run(run())
    assert results == reference  # every stream whole, greedy tokens as if nothing had happened
    assert pool.num_migrations == migrations_before + 1  # the general stream moved to its other worker
    models = health(factory)
    assert models["specialist"]["status"] == "ok"
    assert models["specialist"]["engine"]["num_running"] == 0
    deadline = time.monotonic() + 60  # the general pool restarts its dead worker
    while not all(w["alive"] for w in health(factory)["general"]["workers"]):
        assert time.monotonic() < deadline, "the dead general worker was not restarted"
        time.sleep(0.2)


def test_a_model_whose_only_engine_died_fails_alone(factory):
    specialist = factory.app.state.pools.models["specialist"].worker
    os.kill(specialist.info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while specialist.is_alive:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as err:
        factory.client.completions.create(model="specialist", prompt="hi", max_tokens=2)
    assert err.value.status_code == 503
    reply = factory.client.completions.create(model="general", prompt="still here?", max_tokens=3,
                                              extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3
    resp = factory.health()
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "degraded"
    assert {m["model"]: m["status"] for m in body["models"]} == {"general": "ok", "specialist": "unavailable"}
