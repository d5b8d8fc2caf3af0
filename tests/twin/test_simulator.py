import pytest

from tokenfactory.engine.config import SchedulerConfig
from tokenfactory.twin.cost_model import CostModel, default_model
from tokenfactory.twin.hardware import get_hardware
from tokenfactory.control.router import ROUTERS, make_router
from tokenfactory.twin.simulator import Simulator, TwinConfig
from tokenfactory.twin.workloads import (
    MOONCAKE_TRACE,
    LengthDistribution,
    TraceRequest,
    load_mooncake,
    poisson_workload,
)


def make_config(num_workers: int = 2, hardware: str = "h200", **overrides) -> TwinConfig:
    return TwinConfig(CostModel(default_model(), get_hardware(hardware)), num_workers=num_workers, **overrides)


def small_workload(num_requests: int = 60, seed: int = 0) -> list[TraceRequest]:
    return poisson_workload(20.0, num_requests, LengthDistribution(600, 0.8), LengthDistribution(40, 0.8), seed=seed)


def assert_no_leaked_blocks(result) -> None:
    for worker in result.workers:
        assert not worker.scheduler.has_unfinished()
        assert worker.kv.num_free_blocks == worker.kv.num_blocks
        assert worker.kv.usage == 0.0


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_request_finishes_with_its_traced_output_length(router):
    workload = small_workload()
    result = Simulator(make_config(), make_router(router)).run(workload)
    assert result.summary.num_finished == len(workload)
    for trace, record in zip(workload, result.records):
        assert record.num_output_tokens == trace.output_length
        assert trace.arrival_time < record.first_token <= record.finish
    assert result.summary.output_tokens == sum(r.output_length for r in workload)
    assert_no_leaked_blocks(result)
    assert all(w.num_steps > 0 for w in result.workers)


def test_a_tight_kv_cache_preempts_yet_finishes_everything():
    scheduler = SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=64)
    config = make_config(num_workers=1, scheduler=scheduler, num_blocks=300)  # 4800 tokens
    workload = poisson_workload(200.0, 40, LengthDistribution(1200), LengthDistribution(1000), seed=2)
    result = Simulator(config).run(workload)
    assert result.summary.num_finished == 40
    assert result.summary.num_preemptions > 0
    assert_no_leaked_blocks(result)


def test_shared_prefixes_hit_the_real_prefix_cache():
    workload = [TraceRequest(0.5 * i, 2000, 8, hash_ids=(0, 1, 2, 100 + i), uid=i) for i in range(10)]
    result = Simulator(make_config(num_workers=1)).run(workload)
    # every request after the first finds 1536 tokens cached
    assert result.summary.prefix_hit_rate == pytest.approx(9 * 1536 / (10 * 2000))
    assert result.records[1].ttft < result.records[0].ttft


def test_same_inputs_give_the_same_metrics():
    first = Simulator(make_config(), make_router("least_loaded")).run(small_workload(seed=5)).summary
    second = Simulator(make_config(), make_router("least_loaded")).run(small_workload(seed=5)).summary
    assert first == second


def test_faster_hardware_serves_the_same_load_sooner():
    workload = small_workload(40)
    h100 = Simulator(make_config(hardware="h100")).run(workload).summary
    b200 = Simulator(make_config(hardware="b200")).run(workload).summary
    assert b200.e2e.p50 < h100.e2e.p50
    assert h100.energy_j > 0 and h100.joules_per_token > 0 and h100.dollars_per_million_tokens > 0


def test_requests_longer_than_the_cache_are_rejected_not_hung():
    simulator = Simulator(make_config(num_workers=1, num_blocks=64))  # 1024 tokens in all
    workload = [TraceRequest(0.0, 5000, 4, uid=0), TraceRequest(0.1, 100, 4, uid=1)]
    summary = simulator.run(workload).summary
    assert (summary.num_finished, summary.num_rejected) == (1, 1)


@pytest.mark.skipif(not MOONCAKE_TRACE.is_file(), reason="Mooncake trace not in ../shared/data")
def test_mooncake_prefix_replays_with_prefix_hits():
    workload = load_mooncake(limit=80)
    result = Simulator(make_config(num_workers=2), make_router("least_loaded")).run(workload)
    assert result.summary.num_finished == 80
    assert [r.num_output_tokens for r in result.records] == [t.output_length for t in workload]
    assert result.summary.prefix_hit_rate > 0
    assert_no_leaked_blocks(result)


def conversations(num_conversations: int = 8, turns: int = 4) -> list[TraceRequest]:
    """Multi-turn chats: each turn's prompt is the previous turn's plus one new 512-token block."""
    requests = []
    for turn in range(turns):
        for chat in range(num_conversations):
            blocks = tuple(1000 * chat + b for b in range(turn + 2))
            uid = len(requests)
            requests.append(TraceRequest(2.0 * turn + 0.05 * chat, 512 * len(blocks) - 100, 16, blocks, uid))
    return requests


def test_the_kv_router_finds_more_cached_prefix_than_round_robin():
    workload = conversations(num_conversations=7)  # 7 chats on 4 workers: round robin moves each chat
    kv = Simulator(make_config(num_workers=4), make_router("kv")).run(workload)
    round_robin = Simulator(make_config(num_workers=4), make_router("round_robin")).run(workload)
    assert kv.summary.num_finished == round_robin.summary.num_finished == len(workload)
    assert kv.summary.prefix_hit_rate > 2 * round_robin.summary.prefix_hit_rate
    assert kv.summary.ttft.p50 < round_robin.summary.ttft.p50
    assert_no_leaked_blocks(kv)


def test_the_kv_routers_index_matches_what_the_workers_cache():
    simulator = Simulator(make_config(num_workers=3), make_router("kv"))
    result = simulator.run(conversations(4, 2))
    assert sum(w.kv.num_cached_blocks for w in result.workers) > 0
    for worker in result.workers:
        assert simulator.index.num_blocks(worker.index) == worker.kv.num_cached_blocks
