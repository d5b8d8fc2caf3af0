import pytest

from tokenfactory.bench.routing_bench import shared_lru_hit_rate
from tokenfactory.engine.kv_cache import prompt_block_hashes
from tokenfactory.twin.workloads import (
    AZURE_TRACE,
    MOONCAKE_TRACE,
    LengthDistribution,
    TraceRequest,
    block_reuse,
    block_tokens,
    load_azure,
    load_mooncake,
    load_trace,
    poisson_workload,
    prompt_token_ids,
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
