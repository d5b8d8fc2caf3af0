import pytest

from tokenfactory.bench.routing_bench import shared_lru_hit_rate
from tokenfactory.engine.kv_cache import prompt_block_hashes
from tokenfactory.twin.workloads import (
    AZURE_TRACE,
    MOONCAKE_TRACE,
    AgenticSessions,
    ClosedLoop,
    LengthDistribution,
    PromptHasher,
    TraceRequest,
    block_reuse,
    block_tokens,
    diurnal_workload,
    load_azure,
    load_mooncake,
    load_trace,
    poisson_workload,
    prompt_token_ids,
    synthetic_workload,
)

needs_mooncake = pytest.mark.skipif(not MOONCAKE_TRACE.is_file(), reason="Mooncake trace not in ../shared/data")
needs_azure = pytest.mark.skipif(not AZURE_TRACE.is_file(), reason="Azure trace not in ../shared/data")


def test_equal_hash_ids_give_identical_blocks_and_different_ones_differ():
    assert block_tokens(7) == block_tokens(7)
    assert len(block_tokens(7)) == 512
    assert block_tokens(7)[:16] != block_tokens(8)[:16]
    assert block_tokens(5)[:16] != block_tokens(5 + 128000)[:16]  # ids beyond the vocabulary


def test_prompts_share_exactly_their_common_hash_id_prefix():
    a = TraceRequest(0.0, 1500, 10, hash_ids=(0, 1, 2))
    b = TraceRequest(0.0, 1100, 10, hash_ids=(0, 1, 9))
    ta, tb = prompt_token_ids(a), prompt_token_ids(b)
    assert len(ta) == 1500 and len(tb) == 1100  # the last block is partial
    assert ta[:1024] == tb[:1024]
    assert ta[1024:1040] != tb[1024:1040]
    ha, hb = prompt_block_hashes(ta, 16), prompt_block_hashes(tb, 16)
    assert ha[:64] == hb[:64] and ha[64] != hb[64]  # the KV cache sees 1024 shared tokens


def test_unique_prompts_share_nothing():
    a, b = (prompt_token_ids(TraceRequest(0.0, 700, 5, uid=u)) for u in (1, 2))
    assert len(a) == 700 and a[:16] != b[:16]


@needs_mooncake
def test_mooncake_prefix_is_parsed_rebased_and_sped_up():
    trace = load_mooncake(limit=100)
    assert len(trace) == 100
    assert trace[0].arrival_time == 0.0
    assert all(x.arrival_time <= y.arrival_time for x, y in zip(trace, trace[1:]))
    first = trace[0]
    assert first.input_length == 6758 and first.output_length == 500 and len(first.hash_ids) == 14
    assert len(prompt_token_ids(first)) == 6758
    fast = load_trace(MOONCAKE_TRACE, "auto", speedup=4.0, limit=100)
    assert fast[-1].arrival_time == pytest.approx(trace[-1].arrival_time / 4)
    # the conversation trace reuses a common first block
    assert sum(1 for r in trace if r.hash_ids[0] == first.hash_ids[0]) > 10


@needs_azure
def test_azure_prefix_is_parsed():
    trace = load_azure(limit=50)
    assert len(trace) == 50 and trace[0].arrival_time == 0.0
    assert (trace[0].input_length, trace[0].output_length) == (374, 44)
    assert 4.0 < trace[1].arrival_time < 4.7  # 18:15:46.68 -> 18:15:51.00
    assert all(r.hash_ids == () for r in trace)


def test_poisson_workload_is_deterministic_with_the_asked_lengths():
    fixed = poisson_workload(5.0, 200, LengthDistribution(100), LengthDistribution(20), seed=3)
    assert fixed == poisson_workload(5.0, 200, LengthDistribution(100), LengthDistribution(20), seed=3)
    assert all(r.input_length == 100 and r.output_length == 20 for r in fixed)
    assert 200 / 5.0 * 0.7 < fixed[-1].arrival_time < 200 / 5.0 * 1.3
    spread = poisson_workload(5.0, 2000, LengthDistribution(1000, 1.0), LengthDistribution(50, 0.5), seed=1)
    mean = sum(r.input_length for r in spread) / len(spread)
    assert 800 < mean < 1200
    assert len({r.input_length for r in spread}) > 500


@needs_mooncake
def test_unlimited_cache_reuse_matches_the_data_and_the_real_block_hashes():
    whole = load_mooncake(MOONCAKE_TRACE)
    assert 0.36 <= block_reuse(whole).block_fraction <= 0.38  # the data's "about 37%"
    # Through the engine's own 16-token block hashes of the synthesized prompts, an unlimited
    # shared cache serves the same share of prompt tokens as the trace's hash_ids say.
    head = whole[:300]
    assert shared_lru_hit_rate(head, 10**15, 16) == pytest.approx(block_reuse(head).token_fraction, abs=0.002)


@pytest.mark.parametrize("block_size", [16, 32, 48])
def test_the_prompt_hasher_gives_the_kv_caches_own_hashes_hashing_each_block_once(block_size):
    requests = [
        TraceRequest(0.0, 1500, 4, (0, 1, 2)),
        TraceRequest(0.0, 1100, 4, (0, 1, 9)),  # shares two blocks, then differs
        TraceRequest(0.0, 512 * 3, 4, (0, 1, 2)),  # the first one's blocks, the last one whole
        TraceRequest(0.0, 700, 4, uid=5),  # no hash_ids: a unique prompt
        TraceRequest(0.0, 10, 4, (3,)),  # shorter than a block of the cache
    ]
    hasher = PromptHasher(block_size)
    for request in requests:
        assert hasher(request) == prompt_block_hashes(prompt_token_ids(request), block_size)
    if 512 % block_size == 0:  # blocks 0, 1, 2, 9, 3 each hashed once
        assert len(hasher._blocks) == 5



def test_hashing_ahead_in_a_second_process_gives_the_same_hashes_in_order_and_out():
    requests = [TraceRequest(0.0, 600 + 500 * (i % 4), 4, tuple(range(i % 3, i % 3 + 1 + i % 4)), uid=i)
                for i in range(100)]
    requests[50] = TraceRequest(0.0, 900, 4, uid=50)  # a unique prompt, hashed from its tokens
    local, ahead = PromptHasher(16), PromptHasher(16)
    ahead.hash_ahead(requests)
    try:
        stranger = TraceRequest(0.0, 700, 4, (5, 6))
        assert ahead(stranger) == local(stranger)  # not on the list: hashed here, the list not skipped
        for request in requests:
            assert ahead(request) == local(request)
        assert ahead._ahead._position == len(requests)
        assert len(ahead._blocks) == 2  # the stranger's two blocks: the child hashed all the others
    finally:
        ahead.close()
    assert ahead._ahead is None and ahead(requests[0]) == local(requests[0])


def test_gamma_arrivals_keep_the_rate_and_have_the_asked_burstiness():
    for burstiness in (0.5, 1.0, 3.0):
        trace = synthetic_workload(10.0, 20000, LengthDistribution(100), LengthDistribution(10), burstiness, seed=4)
        gaps = [b.arrival_time - a.arrival_time for a, b in zip(trace, trace[1:])]
        mean = sum(gaps) / len(gaps)
        cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
        assert mean == pytest.approx(0.1, rel=0.05)
        assert cv == pytest.approx(burstiness, rel=0.1)
    same = synthetic_workload(5.0, 50, LengthDistribution(100), LengthDistribution(10), 1.0, seed=2)
    assert same == poisson_workload(5.0, 50, LengthDistribution(100), LengthDistribution(10), seed=2)
    with pytest.raises(ValueError, match="burstiness"):
        synthetic_workload(5.0, 5, LengthDistribution(100), LengthDistribution(10), 0.0)


def test_a_diurnal_day_peaks_at_noon_with_the_asked_swing():
    day = diurnal_workload(200_000, LengthDistribution(1000, 1.0), LengthDistribution(200), peak_to_trough=3.0)
    assert len(day) == 200_000 and day[0].arrival_time >= 0 and day[-1].arrival_time <= 86400
    assert all(a.arrival_time <= b.arrival_time for a, b in zip(day, day[1:]))
    hours = [0] * 24
    for request in day:
        hours[int(request.arrival_time // 3600)] += 1
    assert hours.index(max(hours)) in (11, 12)
    assert hours.index(min(hours)) in (0, 23)
    assert 2.5 < max(hours) / min(hours) < 3.3
    assert sum(r.input_length for r in day) / len(day) == pytest.approx(1000, rel=0.03)
    assert {r.output_length for r in day} == {200}


def drive(workload, service_s: float = 1.0) -> list[TraceRequest]:
    """Run a closed-loop workload on an ideal server: each request finishes `service_s` after it arrives."""
    pending = sorted(workload.start(), key=lambda r: r.arrival_time)
    done = []
    while pending:
        request = pending.pop(0)
        done.append(request)
        pending.extend(workload.on_finish(request, request.arrival_time + service_s))
        pending.sort(key=lambda r: r.arrival_time)
    return done


def test_closed_loop_clients_send_their_next_request_after_the_last_one_finished():
    workload = ClosedLoop(4, 10, LengthDistribution(100), LengthDistribution(20), think_s=0.5)
    first = workload.start()
    assert [r.arrival_time for r in first] == [0.0] * 4
    assert len({r.session_id for r in first}) == 4
    done = drive(ClosedLoop(4, 10, LengthDistribution(100), LengthDistribution(20), think_s=0.5))
    assert len(done) == 10 and len({r.uid for r in done}) == 10
    by_client = {}
    for request in done:
        by_client.setdefault(request.session_id, []).append(request.arrival_time)
    for times in by_client.values():  # service 1 s + think 0.5 s
        assert all(b - a == pytest.approx(1.5) for a, b in zip(times, times[1:]))


def test_agentic_turns_grow_one_context_and_sub_agents_start_from_it():
    workload = AgenticSessions(20, 1.0, fanout_probability=0.5, seed=3)
    done = drive(workload)
    assert workload._sessions == {}  # every task and sub-agent ran to its end
    tasks = {r.session_id for r in done if "." not in r.session_id}
    subs = [r for r in done if "." in r.session_id]
    assert len(tasks) == 20 and subs
    turns: dict[str, list[TraceRequest]] = {}
    for request in done:
        turns.setdefault(request.session_id, []).append(request)
        assert len(prompt_token_ids(request)) == request.input_length
    for session, its in turns.items():
        for before, after in zip(its, its[1:]):  # each turn's prompt extends the previous one
            assert after.input_length > before.input_length
            assert prompt_token_ids(after)[: before.input_length] == prompt_token_ids(before)
    for sub in subs:  # a sub-agent's first prompt starts with its parent's context so far
        parent = turns[sub.session_id.rsplit(".", 1)[0]]
        earlier = [p for p in parent if p.arrival_time <= sub.arrival_time]
        head = prompt_token_ids(earlier[-1])
        assert prompt_token_ids(turns[sub.session_id][0])[: len(head)] == head
    shared = prompt_token_ids(done[0])[:2048]  # the system prompt all tasks share
    assert all(prompt_token_ids(r)[:2048] == shared for r in done)
