import argparse

import pytest

from tokenfactory.bench import disagg_bench
from tokenfactory.control.disagg import DisaggConfig
from tokenfactory.control.router import ROUTERS, make_router
from tokenfactory.twin.cost_model import CostModel, default_model
from tokenfactory.twin.disagg_sim import ALWAYS_SPLIT, DisaggregatedSimulator, SplitConfig
from tokenfactory.twin.hardware import get_hardware
from tokenfactory.twin.simulator import Simulator, TwinConfig
from tokenfactory.twin.workloads import LengthDistribution, TraceRequest, poisson_workload

NEVER_SPLIT = DisaggConfig(min_prompt_tokens=10**9)


def make_config(num_workers: int = 4, **overrides) -> TwinConfig:
    return TwinConfig(CostModel(default_model(), get_hardware("h200")), num_workers=num_workers, **overrides)


def long_prompts(num_requests: int = 80, rate: float = 20.0, seed: int = 0) -> list[TraceRequest]:
    return poisson_workload(rate, num_requests, LengthDistribution(2000, 0.8), LengthDistribution(60, 0.8), seed=seed)


def assert_every_request_done_and_no_block_left(result, workload) -> None:
    assert result.summary.num_finished == len(workload)
    for trace, record in zip(workload, result.records):
        assert record.num_output_tokens == trace.output_length
        assert trace.arrival_time < record.first_token <= record.last_token == record.finish
    assert result.summary.output_tokens == sum(r.output_length for r in workload)
    for worker in result.workers:
        assert not worker.scheduler.has_unfinished()
        assert worker.kv.num_free_blocks == worker.kv.num_blocks


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_split_requests_all_finish_and_leak_no_blocks(router):
    workload = long_prompts()
    simulator = DisaggregatedSimulator(make_config(), SplitConfig(2, ALWAYS_SPLIT), make_router(router))
    result = simulator.run(workload)
    assert_every_request_done_and_no_block_left(result, workload)
    assert simulator.num_split == len(workload)
    assert simulator.num_transfers_admitted == sum(r.output_length > 1 for r in workload)


def test_prefill_workers_compute_the_prompts_and_decode_workers_the_rest():
    workload = long_prompts(40)  # unique prompts: nothing is cached anywhere
    simulator = DisaggregatedSimulator(make_config(), SplitConfig(1, ALWAYS_SPLIT))
    result = simulator.run(workload)
    assert_every_request_done_and_no_block_left(result, workload)
    prefill, decode = result.workers[:1], result.workers[1:]
    assert sum(w.num_tokens_computed for w in prefill) == sum(r.input_length for r in workload)
    # the prompt's KV arrived; each later token is computed once, one decode step at a time
    assert sum(w.num_tokens_computed for w in decode) == sum(r.output_length - 1 for r in workload)
    assert all(w.num_steps > 0 for w in decode)


def test_the_transfer_delays_the_second_token_not_the_first():
    workload = [TraceRequest(0.0, 8000, 20, uid=0)]
    config = make_config(num_workers=2)
    fast = DisaggregatedSimulator(config, SplitConfig(1, ALWAYS_SPLIT)).run(workload).records[0]
    slow_split = SplitConfig(1, ALWAYS_SPLIT, transfer_bandwidth=1e9)
    slow_simulator = DisaggregatedSimulator(config, slow_split)
    slow = slow_simulator.run(workload).records[0]
    assert slow.first_token == fast.first_token
    extra = slow_simulator.transfer_time(8000) - DisaggregatedSimulator(config, SplitConfig(1)).transfer_time(8000)
    assert extra == pytest.approx(8000 * config.cost.kv_bytes_per_token * (1 / 1e9 - 1 / 900e9))
    assert slow.finish - fast.finish == pytest.approx(extra)
    assert slow.itl > fast.itl


@pytest.mark.parametrize("router", ["round_robin", "kv"])
def test_serving_everything_whole_matches_the_aggregated_decode_fleet(router):
    workload = long_prompts(60, seed=3)
    aggregated = Simulator(make_config(num_workers=3), make_router(router)).run(workload)
    split = DisaggregatedSimulator(make_config(num_workers=5), SplitConfig(2, NEVER_SPLIT), make_router(router))
    disaggregated = split.run(workload)
    assert split.num_split == 0
    assert disaggregated.records == aggregated.records
    assert all(w.num_steps == 0 for w in disaggregated.workers[:2])
    assert disaggregated.summary.energy_j > aggregated.summary.energy_j  # idle prefill GPUs still draw power


def test_no_prefill_workers_is_the_aggregated_simulator():
    workload = long_prompts(50, seed=4)
    aggregated = Simulator(make_config(), make_router("least_loaded")).run(workload).summary
    split = DisaggregatedSimulator(make_config(), SplitConfig(0), make_router("least_loaded")).run(workload).summary
    assert split == aggregated


@pytest.mark.parametrize("router", ["kv", "round_robin"])  # the index's view, or the cache's own
def test_conditional_split_serves_prompts_cached_on_the_decode_worker_whole(router):
    prefix = tuple(range(8))  # 4096 shared tokens, then a unique tail
    workload = [TraceRequest(5.0 * i, 4500, 30, hash_ids=(*prefix, 100 + i), uid=i) for i in range(3)]
    workload.append(TraceRequest(15.0, 100, 30, uid=9))  # short: served whole
    simulator = DisaggregatedSimulator(make_config(num_workers=2), SplitConfig(1), make_router(router))
    result = simulator.run(workload)
    assert_every_request_done_and_no_block_left(result, workload)
    assert simulator.num_split == 1  # the first one; the decode worker then holds the prefix
    assert result.records[1].num_cached_tokens == result.records[2].num_cached_tokens == 4096
    assert result.records[1].ttft < result.records[0].ttft


def test_a_full_decode_worker_recomputes_transfers_and_still_finishes():
    scheduler_config = make_config().scheduler
    config = make_config(num_workers=2, num_blocks=400)  # 6400 tokens per worker
    workload = poisson_workload(50.0, 30, LengthDistribution(1500), LengthDistribution(400), seed=2)
    simulator = DisaggregatedSimulator(config, SplitConfig(1, ALWAYS_SPLIT, prefill_scheduler=scheduler_config))
    result = simulator.run(workload)
    assert_every_request_done_and_no_block_left(result, workload)
    assert simulator.num_transfers_recomputed > 0
    assert result.summary.num_preemptions > 0


def test_fast_forward_gives_the_same_records_as_stepping_every_decode():
    workload = long_prompts(60, rate=10.0, seed=6)
    runs = [
        DisaggregatedSimulator(make_config(fast_forward=ff), SplitConfig(1), make_router("kv")).run(workload)
        for ff in (True, False)
    ]
    for fast, slow in zip(runs[0].records, runs[1].records):  # the skip prices decode stretches in closed form
        assert fast.first_token == pytest.approx(slow.first_token, rel=1e-9)
        assert fast.finish == pytest.approx(slow.finish, rel=1e-9)
        assert fast.num_output_tokens == slow.num_output_tokens


def test_a_split_needs_a_decode_worker_and_sane_transfer_numbers():
    with pytest.raises(ValueError, match="no decode worker"):
        DisaggregatedSimulator(make_config(num_workers=2), SplitConfig(2))
    with pytest.raises(ValueError, match="transfer_bandwidth"):
        SplitConfig(1, transfer_bandwidth=0)
    with pytest.raises(ValueError, match="num_prefill"):
        SplitConfig(-1)


def test_the_bench_compares_every_split_with_aggregated_and_checks_the_goals(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    rows = [f"2023-11-16 18:15:{i // 2:02d}.{5 * (i % 2)}000000,{600 + 40 * i},{20 + i}" for i in range(30)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    parser = argparse.ArgumentParser()
    disagg_bench.add_arguments(parser)
    args = parser.parse_args(["--trace", str(trace), "--gpus", "3", "--limit", "30", "--speedups", "1", "4",
                              "--aggregated-budgets", "1024", "8192", "--refine", "1"])
    assert disagg_bench.main(args) == 0
    out = capsys.readouterr().out
    for layout in ("aggregated, 1024-token steps", "aggregated, 8192-token steps", "1P:2D", "2P:1D", "conditional"):
        assert layout in out
    assert "DistServe-style" in out
    assert sum(line.startswith(("PASS", "MISS")) for line in out.splitlines()) == 2
