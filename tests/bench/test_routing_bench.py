"""`bench routing`: every policy through the twin, against the shared-LRU bound."""

from __future__ import annotations

import argparse

import pytest

from tokenfactory.bench import routing_bench
from tokenfactory.control.router import ROUTERS
from tokenfactory.twin.cost_model import CostModel, default_model
from tokenfactory.twin.hardware import get_hardware
from tokenfactory.twin.simulator import TwinConfig
from tokenfactory.twin.workloads import MOONCAKE_TRACE, TraceRequest


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    routing_bench.add_arguments(parser)
    return parser.parse_args(argv)


def chats(num_chats: int = 7, turns: int = 4) -> list[TraceRequest]:
    """Each turn's prompt is the previous turn's plus one new 512-token block."""
    requests = []
    for turn in range(turns):
        for chat in range(num_chats):
            blocks = tuple(1000 * chat + b for b in range(turn + 2))
            requests.append(TraceRequest(2.0 * turn + 0.05 * chat, 512 * len(blocks) - 100, 16, blocks, len(requests)))
    return requests


def test_the_shared_lru_bound_is_at_least_every_routers_hit_rate():
    cost = CostModel(default_model(), get_hardware("h200"))
    config = TwinConfig(cost, num_workers=4, num_blocks=400)  # 6400 tokens: chats evict each other
    workload = chats()
    bound = routing_bench.shared_lru_hit_rate(workload, 4 * 400, 16)
    runs = [routing_bench.run_router(name, config, workload) for name in ROUTERS]
    assert all(run.num_finished == len(workload) for run in runs)
    assert 0 < max(run.prefix_hit_rate for run in runs) <= bound


def test_with_room_for_every_chat_kv_routing_reaches_the_bound_caching_each_block_once():
    cost = CostModel(default_model(), get_hardware("h200"))
    config = TwinConfig(cost, num_workers=4, num_blocks=4000)
    workload = chats()
    bound = routing_bench.shared_lru_hit_rate(workload, 4 * 4000, 16)
    kv = routing_bench.run_router("kv", config, workload)
    assert kv.prefix_hit_rate == pytest.approx(bound)
    assert kv.forgone_fraction == 0 and kv.copies_per_block == 1.0
    assert kv.busiest_over_mean < 1.5  # 7 chats on 4 workers: two each at most


def test_the_shared_lru_bound_counts_reuse_and_forgets_what_it_evicted():
    first, again = TraceRequest(0, 1024, 1, (1, 2)), TraceRequest(1, 1024, 1, (1, 2))
    other = TraceRequest(0.5, 1024, 1, (3, 4))
    assert routing_bench.shared_lru_hit_rate([first, again], 64, 16) == pytest.approx(1008 / 2048)
    assert routing_bench.shared_lru_hit_rate([first, other, again], 64, 16) == 0.0  # 64 blocks hold one prompt


def test_the_goals_are_marked_pass_or_miss():
    kv = routing_bench.RouterRun("kv", 0.30, 1.1, 0.1, 1.0, 10, 0.0)
    round_robin = routing_bench.RouterRun("round_robin", 0.05, 1.0, 0.2, 0.9, 10, 0.0)
    lines = routing_bench.goal_lines({"kv": kv, "round_robin": round_robin}, bound=0.40)
    assert [line.split()[0] for line in lines] == ["PASS", "MISS", "PASS", "PASS", "MISS"]


@pytest.mark.skipif(not MOONCAKE_TRACE.is_file(), reason="Mooncake trace not in ../shared/data")
def test_bench_routing_prints_the_table_and_the_goals(capsys):
    assert routing_bench.main(parse(["--limit", "40", "--workers", "4"])) == 0
    out = capsys.readouterr().out
    assert "shared LRU" in out and "TTFT p99" in out
    for name in ROUTERS:
        assert name in out
    assert "kv hit rate >= 3x round robin's" in out and "busiest worker" in out


@pytest.mark.skipif(not MOONCAKE_TRACE.is_file(), reason="Mooncake trace not in ../shared/data")
def test_bench_routing_passes_the_kv_weights_to_the_kv_policy(capsys):
    args = ["--limit", "40", "--workers", "4", "--routers", "kv", "--kv-work-weight", "0", "--kv-balance-weight", "1"]
    assert routing_bench.main(parse(args)) == 0
    out = capsys.readouterr().out
    assert "kv hit rate >= 95% of the shared-LRU bound" in out and "round robin's" not in out
    assert routing_bench.main(parse(["--limit", "4", "--routers", "kv", "--kv-work-weight", "-1"])) == 2
    assert "kv weights must be >= 0" in capsys.readouterr().out


def test_bench_routing_refuses_a_missing_trace(tmp_path, capsys):
    assert routing_bench.main(parse(["--trace", str(tmp_path / "absent.jsonl")])) == 2
    assert "trace not found" in capsys.readouterr().out
