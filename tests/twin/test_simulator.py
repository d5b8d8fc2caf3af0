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


def run_both_ways(workload: list[TraceRequest], router: str = "kv", **config) -> tuple:
    runs = []
    for fast_forward in (True, False):
        simulator = Simulator(make_config(fast_forward=fast_forward, **config), make_router(router))
        runs.append((simulator, simulator.run(workload)))
    return runs[0], runs[1]


def assert_same_run(fast: tuple, slow: tuple) -> None:
    (fast_sim, fast_result), (slow_sim, slow_result) = fast, slow
    for a, b in zip(fast_result.records, slow_result.records, strict=True):
        assert (a.num_output_tokens, a.num_cached_tokens) == (b.num_output_tokens, b.num_cached_tokens)
        for x, y in ((a.first_token, b.first_token), (a.last_token, b.last_token), (a.finish, b.finish)):
            assert x == pytest.approx(y, rel=1e-9)
    assert fast_result.summary.prefix_hit_rate == slow_result.summary.prefix_hit_rate
    assert fast_result.summary.num_preemptions == slow_result.summary.num_preemptions
    for a, b in zip(fast_result.workers, slow_result.workers):
        assert (a.num_steps, a.num_tokens_computed) == (b.num_steps, b.num_tokens_computed)
        assert a.energy_j == pytest.approx(b.energy_j, rel=1e-9)
        assert a.kv._hash_to_block == b.kv._hash_to_block  # every stored and removed block alike
        if fast_sim.index is not None:
            assert fast_sim.index.num_blocks(a.index) == slow_sim.index.num_blocks(b.index)
    assert_no_leaked_blocks(fast_result)



def test_hashing_prompts_ahead_in_another_process_gives_the_same_run():
    workload = load_mooncake(limit=60) if MOONCAKE_TRACE.is_file() else conversations(8, 4)
    here = Simulator(make_config(num_workers=2), make_router("kv"))
    ahead = Simulator(make_config(num_workers=2, hash_ahead=True), make_router("kv"))
    assert_same_run((ahead, ahead.run(workload)), (here, here.run(workload)))
    assert ahead._hasher._ahead is None and not ahead._hasher._blocks  # the child hashed every prompt


def test_fast_forward_gives_the_same_run_as_stepping_every_decode():
    workload = load_mooncake(limit=60) if MOONCAKE_TRACE.is_file() else conversations(8, 4)
    fast, slow = run_both_ways(workload, num_workers=2)
    assert_same_run(fast, slow)
    steps = sum(w.num_steps for w in fast[1].workers)
    assert steps > (1000 if MOONCAKE_TRACE.is_file() else 200)  # long decode stretches to skip
    assert fast[0]._seq < steps // 4  # and most of them were skipped


def test_fast_forward_matches_under_preemption_and_poisson_load():
    scheduler = SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=64)
    workload = poisson_workload(50.0, 40, LengthDistribution(1200), LengthDistribution(1000, 0.5), seed=3)
    fast, slow = run_both_ways(workload, router="least_loaded", num_workers=1, scheduler=scheduler, num_blocks=300)
    assert fast[1].summary.num_preemptions > 0
    assert_same_run(fast, slow)


def test_fast_forward_keeps_the_first_token_time_of_a_prompt_cached_but_for_one_token():
    # the second prompt is the first plus one token: its first step computes a single token
    workload = [TraceRequest(0.0, 1024, 50, (0, 1), uid=0), TraceRequest(5.0, 1025, 50, (0, 1, 2), uid=1)]
    fast, slow = run_both_ways(workload, router="round_robin", num_workers=1)
    assert fast[1].records[1].num_cached_tokens == 1024
    assert_same_run(fast, slow)


def test_fast_forward_gives_the_same_run_for_closed_loop_and_agentic_workloads():
    from tokenfactory.twin.workloads import AgenticSessions, ClosedLoop

    for make in (
        lambda: ClosedLoop(16, 80, LengthDistribution(700, 0.5), LengthDistribution(60, 0.8), think_s=0.0, seed=1),
        lambda: ClosedLoop(8, 60, LengthDistribution(300), LengthDistribution(40), think_s=0.3, seed=2),
        lambda: AgenticSessions(8, 2.0, fanout_probability=0.4, think_s=0.5, seed=5),
    ):
        runs = []
        for fast_forward in (True, False):
            simulator = Simulator(make_config(num_workers=3, fast_forward=fast_forward), make_router("kv"))
            runs.append((simulator, simulator.run(make())))
        fast, slow = runs
        assert len(fast[1].records) == len(slow[1].records) > 0
        assert_same_run(fast, slow)
        assert fast[0]._seq < slow[0]._seq  # fewer events: it did skip


def test_a_closed_loop_keeps_its_clients_requests_in_flight_and_no_more():
    from tokenfactory.twin.workloads import ClosedLoop

    workload = ClosedLoop(6, 48, LengthDistribution(400), LengthDistribution(30), think_s=0.0)
    result = Simulator(make_config(num_workers=2), make_router("least_loaded")).run(workload)
    assert result.summary.num_finished == 48
    events = sorted([(r.arrival, 1) for r in result.records] + [(r.finish, -1) for r in result.records],
                    key=lambda e: (e[0], e[1]))
    in_flight = peak = 0
    for _, change in events:
        in_flight += change
        peak = max(peak, in_flight)
    assert peak == 6
    finishes = sorted(r.finish for r in result.records)
    later = sorted(r.arrival for r in result.records)[6:]  # every later request starts as one finishes
    assert all(any(abs(a - f) < 1e-12 for f in finishes) for a in later)


def test_agent_sessions_reach_the_router_for_affinity():
    from tokenfactory.twin.workloads import AgenticSessions

    router = make_router("least_loaded", session_affinity=True)
    result = Simulator(make_config(num_workers=4), router).run(AgenticSessions(10, 1.0, seed=2))
    assert result.summary.num_finished == len(result.records) > 10
    assert router.metrics.affinity_hits > len(result.records) // 2
    assert result.summary.prefix_hit_rate > 0.5  # each turn finds its session's context on its worker


def test_a_run_makes_no_reference_cycles_so_the_collector_can_stay_off():
    import gc

    from tokenfactory.twin.workloads import AgenticSessions

    gc.collect()
    gc.disable()
    try:
        simulator = Simulator(make_config(num_workers=2), make_router("kv"))
        simulator.run(AgenticSessions(4, 2.0, seed=1))
        del simulator
        # Only the twin's and engine's own objects count: a progress bar left by another test
        # (rich's refresh thread) may make cycles of its own meanwhile.
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("tokenfactory")]
        assert ours == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert gc.isenabled()


def test_power_samples_add_up_to_the_runs_energy_and_stay_between_idle_and_tdp():
    config = make_config(num_workers=2, power_interval_s=0.5)
    result = Simulator(config).run(small_workload())
    hw, start, end = config.cost.hardware, result.records[0].arrival, result.summary.duration_s
    lengths = [min(end, (i + 1) * 0.5) - max(start, i * 0.5) for i in range(len(result.power_w))]
    assert sum(p * t for p, t in zip(result.power_w, lengths)) == pytest.approx(result.summary.energy_j, rel=1e-9)
    assert all(2 * hw.idle_w - 1e-6 <= p <= 2 * hw.tdp_w for p in result.power_w)
    assert max(result.power_w) > 2 * hw.idle_w + 100  # it worked somewhere


def test_pods_behind_a_front_balancer_are_independent_simulators():
    from tokenfactory.twin.simulator import simulate_pods

    workload = small_workload(80, seed=3)
    fleet = simulate_pods(make_config(num_workers=2), lambda: make_router("kv"), workload, 2)
    alone = [Simulator(make_config(num_workers=2), make_router("kv")).run(workload[p::2]) for p in range(2)]
    assert fleet.summary.num_finished == 80 and len(fleet.workers) == 4
    for i, record in enumerate(fleet.records):
        assert record == alone[i % 2].records[i // 2]
    assert fleet.summary.output_tokens == sum(r.summary.output_tokens for r in alone)
    assert fleet.summary.output_tokens_per_s_per_gpu == pytest.approx(fleet.summary.output_tokens_per_s / 4)


def test_pods_run_in_other_processes_give_the_same_fleet():
    from tokenfactory.twin.simulator import simulate_pods

    workload = small_workload(60, seed=4)
    here = simulate_pods(make_config(num_workers=2), lambda: make_router("kv"), workload, 3)
    forked = simulate_pods(make_config(num_workers=2), lambda: make_router("kv"), workload, 3, jobs=2)
    assert forked.records == here.records
    assert forked.summary == here.summary and forked.power_w == here.power_w
    assert forked.workers == [] and len(here.workers) == 6
