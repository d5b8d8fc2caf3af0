import random
from collections import defaultdict

import pytest

from tokenfactory.engine.config import SchedulerConfig
from tokenfactory.engine.kv_cache import KVCacheManager
from tokenfactory.engine.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.scheduler import Scheduler

BS = 4
FIRST_OUTPUT_TOKEN = 1000


def make_scheduler(
    num_blocks: int = 64,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 16,
    max_model_len: int | None = None,
    **config,
) -> Scheduler:
    kv = KVCacheManager(num_blocks=num_blocks, block_size=BS)
    cfg = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, **config)
    return Scheduler(cfg, kv, max_model_len=max_model_len)


def make_request(
    request_id: str, num_prompt: int, max_tokens: int = 4, arrival: float = 0.0, priority: int = 0, **sampling
) -> Request:
    prompt = [hash((request_id, i)) % 500 for i in range(num_prompt)]
    return Request(
        request_id,
        prompt,
        SamplingParams(max_tokens=max_tokens, **sampling),
        priority=priority,
        arrival_time=arrival,
    )


class KVCheckingRunner:
    """A fake model runner with a fake KV cache: each computed position writes its token into its
    slot, and each chunk first checks that every earlier position it attends to holds the right
    token. That catches wrong block tables, wrong prefix hits and blocks reused while in use.
    A sampling chunk yields `script[request_id][n]` for its n-th output, else 1000 + n."""

    def __init__(self, script: dict[str, list[int]] | None = None) -> None:
        self.slots: dict[tuple[int, int], int] = {}
        self.script = script or {}

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        result = ModelRunnerOutput()
        for chunk in step.chunks:
            request, blocks = chunk.request, chunk.block_ids
            assert len(blocks) * BS >= chunk.end, "block table too short for the chunk"
            for pos in range(chunk.start):
                assert self.slots.get((blocks[pos // BS], pos % BS)) == request.all_token_ids[pos]
            for pos in range(chunk.start, chunk.end):
                self.slots[(blocks[pos // BS], pos % BS)] = request.all_token_ids[pos]
            if chunk.samples:
                n = request.num_output_tokens
                script = self.script.get(request.request_id)
                token = script[n] if script else FIRST_OUTPUT_TOKEN + n
                result.sampled_token_ids[request.request_id] = token
        return result


def step(scheduler: Scheduler, runner: KVCheckingRunner) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    scheduled = scheduler.schedule()
    assert scheduled.total_num_tokens <= scheduler.config.max_num_batched_tokens
    assert len(scheduled.chunks) <= scheduler.config.max_num_seqs
    result = None if scheduled.is_empty else runner.execute(scheduled)
    return scheduled, scheduler.update_from_output(scheduled, result)


def run_all(scheduler: Scheduler, runner: KVCheckingRunner | None = None, max_steps: int = 2000):
    """Step until done; returns every request's outputs and the steps taken."""
    runner = runner or KVCheckingRunner()
    outputs: dict[str, list[EngineCoreOutput]] = defaultdict(list)
    steps: list[SchedulerOutput] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            break
        scheduled, outs = step(scheduler, runner)
        steps.append(scheduled)
        for out in outs:
            outputs[out.request_id].append(out)
    assert not scheduler.has_unfinished(), "scheduler did not finish its requests"
    return outputs, steps


def tokens(outs: list[EngineCoreOutput]) -> list[int]:
    return [t for out in outs for t in out.new_token_ids]


def assert_no_leaks(scheduler: Scheduler) -> None:
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_blocks
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0


def test_budget_is_respected_and_every_request_gets_its_tokens():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    for i in range(10):
        scheduler.add_request(make_request(f"r{i}", 5 + 4 * i, max_tokens=5 + i % 4, arrival=i))
    outputs, steps = run_all(scheduler)
    assert max(s.total_num_tokens for s in steps) == 16
    for i in range(10):
        n = 5 + i % 4
        assert tokens(outputs[f"r{i}"]) == list(range(FIRST_OUTPUT_TOKEN, FIRST_OUTPUT_TOKEN + n))
        assert outputs[f"r{i}"][-1].finish_reason == "length"
        assert outputs[f"r{i}"][-1].num_prompt_tokens == 5 + 4 * i
    assert_no_leaks(scheduler)


def test_long_prompt_is_prefilled_in_chunks_across_steps():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    scheduler.add_request(make_request("long", 50, max_tokens=2))
    outputs, steps = run_all(scheduler)
    assert [s.num_scheduled_tokens["long"] for s in steps] == [16, 16, 16, 2, 1]
    assert len(outputs["long"]) == 2  # no token until the prompt's last chunk


def test_long_prefill_threshold_caps_each_requests_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    scheduler.add_request(make_request("a", 20, arrival=0))
    scheduler.add_request(make_request("b", 20, arrival=1))
    first, _ = step(scheduler, KVCheckingRunner())
    assert first.num_scheduled_tokens == {"a": 8, "b": 8}


def test_decode_and_prefill_are_mixed_in_one_step():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    runner = KVCheckingRunner()
    scheduler.add_request(make_request("a", 6, max_tokens=8, arrival=0))
    step(scheduler, runner)
    scheduler.add_request(make_request("b", 30, arrival=1))
    mixed, outs = step(scheduler, runner)
    assert mixed.num_scheduled_tokens == {"a": 1, "b": 15}
    assert [o.request_id for o in outs] == ["a"]


def test_without_chunked_prefill_a_prompt_waits_for_room():
    scheduler = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    runner = KVCheckingRunner()
    scheduler.add_request(make_request("a", 10, arrival=0))
    scheduler.add_request(make_request("b", 10, arrival=1))
    first, _ = step(scheduler, runner)
    assert first.num_scheduled_tokens == {"a": 10}
    second, _ = step(scheduler, runner)
    assert second.num_scheduled_tokens == {"a": 1, "b": 10}
    with pytest.raises(ValueError, match="chunked prefill is disabled"):
        scheduler.add_request(make_request("c", 17))


def test_max_num_seqs_caps_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", 4, max_tokens=3, arrival=i))
    outputs, steps = run_all(scheduler)
    assert all(len(s.chunks) <= 2 for s in steps)
    assert set(steps[0].num_scheduled_tokens) == {"r0", "r1"}
    assert all(len(tokens(outputs[f"r{i}"])) == 3 for i in range(4))


def test_preemption_when_blocks_run_out_and_the_victim_still_completes():
    # 8 blocks of 4 = 32 tokens; three requests that each grow to 8 + 12 = 20 tokens.
    scheduler = make_scheduler(num_blocks=8)
    for i, rid in enumerate("abc"):
        scheduler.add_request(make_request(rid, 8, max_tokens=12, arrival=i))
    requests = {rid: scheduler._requests[rid] for rid in "abc"}
    outputs, steps = run_all(scheduler)
    preempted = [rid for s in steps for rid in s.preempted_ids]
    assert preempted and preempted[0] == "c"  # the latest arrival goes first
    assert "a" not in preempted  # the earliest arrival is never the victim
    for rid in "abc":
        assert tokens(outputs[rid]) == list(range(FIRST_OUTPUT_TOKEN, FIRST_OUTPUT_TOKEN + 12))
    assert scheduler.num_preemptions == sum(r.num_preemptions for r in requests.values()) == len(preempted)
    assert_no_leaks(scheduler)


def test_a_higher_priority_arrival_preempts_a_lower_one_and_not_the_reverse():
    scheduler = make_scheduler(num_blocks=6)  # 24 tokens
    runner = KVCheckingRunner()
    scheduler.add_request(make_request("low", 16, max_tokens=4, arrival=0, priority=0))
    step(scheduler, runner)
    scheduler.add_request(make_request("high", 12, max_tokens=4, arrival=1, priority=5))
    scheduled, outs = step(scheduler, runner)
    assert scheduled.preempted_ids == ["low"]
    assert set(scheduled.num_scheduled_tokens) == {"high"}
    assert [o.request_id for o in outs] == ["high"]
    outputs, _ = run_all(scheduler, runner)
    assert len(tokens(outputs["low"])) == 3  # one token before preemption, three after
    assert len(tokens(outputs["high"])) == 3

    scheduler.add_request(make_request("high2", 16, max_tokens=4, arrival=2, priority=5))
    step(scheduler, runner)
    scheduler.add_request(make_request("low2", 12, max_tokens=4, arrival=3, priority=0))
    outputs, steps = run_all(scheduler, runner)
    assert not any(s.preempted_ids for s in steps)
    first_low2 = next(i for i, s in enumerate(steps) if "low2" in s.num_scheduled_tokens)
    assert all("high2" not in s.num_scheduled_tokens for s in steps[first_low2:])  # waited for high2
    assert_no_leaks(scheduler)


def test_running_lower_priority_is_the_victim_even_when_it_arrived_first():
    scheduler = make_scheduler(num_blocks=6)  # 24 tokens; both grow to 8 + 12 = 20
    runner = KVCheckingRunner()
    scheduler.add_request(make_request("low", 8, max_tokens=12, arrival=0, priority=0))
    step(scheduler, runner)
    scheduler.add_request(make_request("high", 8, max_tokens=12, arrival=1, priority=5))
    outputs, steps = run_all(scheduler, runner)
    preempted = [rid for s in steps for rid in s.preempted_ids]
    assert preempted and set(preempted) == {"low"}
    assert len(tokens(outputs["high"])) == 12 and len(tokens(outputs["low"])) == 11  # + 1 before
    assert_no_leaks(scheduler)


def test_waiting_queue_serves_priority_then_arrival():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("old-low", 4, max_tokens=1, arrival=0, priority=0))
    scheduler.add_request(make_request("new-high", 4, max_tokens=1, arrival=2, priority=1))
    scheduler.add_request(make_request("old-high", 4, max_tokens=1, arrival=1, priority=1))
    _, steps = run_all(scheduler)
    order = [next(iter(s.num_scheduled_tokens)) for s in steps if s.chunks]
    assert order == ["old-high", "new-high", "old-low"]


def decoding(scheduler: Scheduler, runner: KVCheckingRunner, priorities: dict[str, int]) -> None:
    """Start one short request per priority and step until all of them decode."""
    for i, (rid, priority) in enumerate(priorities.items()):
        scheduler.add_request(make_request(rid, 4, max_tokens=20, arrival=i, priority=priority))
    while any(scheduler._requests[rid].num_output_tokens == 0 for rid in priorities):
        step(scheduler, runner)


def test_under_a_short_budget_a_waiting_higher_tier_prompt_goes_before_lower_tier_decodes():
    scheduler = make_scheduler()
    runner = KVCheckingRunner()
    decoding(scheduler, runner, {"low0": 0, "low1": 0})
    tables = {rid: list(scheduler.kv.block_ids(rid)) for rid in ("low0", "low1")}
    scheduler.set_token_budget(4)
    scheduler.add_request(make_request("high", 10, max_tokens=2, arrival=5, priority=2))
    chunks = [step(scheduler, runner)[0].num_scheduled_tokens for _ in range(4)]
    # its prompt takes the budget; the decodes skip those steps and resume with what is left
    assert chunks == [{"high": 4}, {"high": 4}, {"high": 2, "low0": 1, "low1": 1}, {"high": 1, "low0": 1, "low1": 1}]
    assert scheduler.num_preemptions == 0
    assert all(scheduler.kv.block_ids(rid)[: len(t)] == t for rid, t in tables.items())  # they kept their blocks
    run_all(scheduler, runner)
    assert_no_leaks(scheduler)


def test_under_a_short_budget_equal_priorities_serve_running_requests_first():
    scheduler = make_scheduler()
    runner = KVCheckingRunner()
    decoding(scheduler, runner, {"a": 1, "b": 1})
    scheduler.set_token_budget(4)
    scheduler.add_request(make_request("new", 10, max_tokens=2, arrival=5, priority=1))
    chunks = [step(scheduler, runner)[0].num_scheduled_tokens for _ in range(3)]
    assert chunks == [{"a": 1, "b": 1, "new": 2}, {"a": 1, "b": 1, "new": 2}, {"a": 1, "b": 1, "new": 2}]


def test_a_waiting_request_goes_before_running_ones_of_lower_tiers_only():
    # running: high (2), low (0); waiting: mid (1), a second low (0), a second high (2)
    scheduler = make_scheduler()
    runner = KVCheckingRunner()
    decoding(scheduler, runner, {"high": 2, "low": 0})
    scheduler.set_token_budget(6)
    scheduler.add_request(make_request("mid", 8, arrival=5, priority=1))
    scheduler.add_request(make_request("low-new", 8, arrival=6, priority=0))
    first, _ = step(scheduler, runner)
    assert list(first.num_scheduled_tokens.items()) == [("high", 1), ("mid", 5)]  # low skips, low-new waits
    scheduler.add_request(make_request("high-new", 8, arrival=7, priority=2))
    second, _ = step(scheduler, runner)
    assert list(second.num_scheduled_tokens.items()) == [("high", 1), ("high-new", 5)]  # mid, a running one, skips too
    scheduler.set_token_budget(64)
    third, _ = step(scheduler, runner)
    # with room again: running in tier order, then the waiting low (running low first at its tier)
    assert list(third.num_scheduled_tokens.items()) == [("high", 1), ("high-new", 3), ("mid", 3), ("low", 1),
                                                        ("low-new", 8)]
    run_all(scheduler, runner)
    assert_no_leaks(scheduler)


def test_a_higher_tier_prompt_that_cannot_start_does_not_stop_lower_tier_decodes():
    scheduler = make_scheduler(max_num_seqs=2)  # full: the prompt waits for a sequence slot, not for blocks
    runner = KVCheckingRunner()
    decoding(scheduler, runner, {"low0": 0, "low1": 0})
    scheduler.set_token_budget(4)
    scheduler.add_request(make_request("high", 10, arrival=5, priority=2))
    scheduled, _ = step(scheduler, runner)
    assert scheduled.num_scheduled_tokens == {"low0": 1, "low1": 1}
    assert not scheduled.preempted_ids


@pytest.mark.parametrize(
    ("sampling", "script", "expected", "finish", "stop_reason"),
    [
        ({}, [5, 6, 2, 7], [5, 6, 2], "stop", None),  # EOS
        ({"ignore_eos": True}, [5, 2, 2, 2, 2, 2], [5, 2, 2, 2, 2, 2], "length", None),
        ({"stop_token_ids": (6,)}, [5, 6, 7], [5, 6], "stop", 6),
        ({"min_tokens": 3}, [2, 2, 2, 2, 2], [2, 2, 2, 2], "stop", None),
        ({"min_tokens": 2, "stop_token_ids": (9,)}, [9, 9, 9, 9], [9, 9, 9], "stop", 9),
        ({}, [5, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5], "length", None),  # max_tokens
    ],
)
def test_stop_conditions(sampling, script, expected, finish, stop_reason):
    scheduler = make_scheduler()
    request = make_request("r", 5, max_tokens=6, **sampling)
    request.eos_token_ids = (2,)
    scheduler.add_request(request)
    outputs, _ = run_all(scheduler, KVCheckingRunner({"r": script}))
    assert tokens(outputs["r"]) == expected
    assert outputs["r"][-1].finish_reason == finish
    assert outputs["r"][-1].stop_reason == stop_reason
    assert all(not o.finished for o in outputs["r"][:-1])
    assert_no_leaks(scheduler)


def test_context_window_ends_a_request_with_length():
    scheduler = make_scheduler(max_model_len=13)
    scheduler.add_request(make_request("r", 10, max_tokens=10))
    outputs, _ = run_all(scheduler)
    assert len(tokens(outputs["r"])) == 3
    assert outputs["r"][-1].finish_reason == "length"


def test_prefix_cache_hit_is_reported_and_skipped():
    scheduler = make_scheduler()
    first = make_request("first", 10, max_tokens=2)
    runner = KVCheckingRunner()  # one fake KV store across both runs: the hit must hold first's KV
    scheduler.add_request(first)
    run_all(scheduler, runner)
    second = Request("second", first.prompt_token_ids[:9] + [77, 78], SamplingParams(max_tokens=2))
    scheduler.add_request(second)
    outputs, steps = run_all(scheduler, runner)
    assert steps[0].num_scheduled_tokens == {"second": 11 - 8}
    assert outputs["second"][0].num_cached_tokens == 8
    assert scheduler.stats().prefix_cache_hit_rate == pytest.approx(8 / (10 + 11))


def test_requests_sharing_an_uncomputed_prefix_wait_for_it_instead_of_recomputing():
    scheduler = make_scheduler(max_num_batched_tokens=64)
    prefix = [7] * 12  # three full blocks
    for i in range(4):
        scheduler.add_request(Request(f"r{i}", prefix + [100 + i, 200 + i], SamplingParams(max_tokens=2),
                                      arrival_time=float(i)))
    unrelated = Request("other", [300 + j for j in range(6)], SamplingParams(max_tokens=2), arrival_time=9.0)
    scheduler.add_request(unrelated)
    outputs, steps = run_all(scheduler)
    # Step 1: r0 computes the shared prefix; the other sharers wait, the unrelated one does not.
    assert steps[0].num_scheduled_tokens == {"r0": 14, "other": 6}
    # Step 2: the sharers arrive to find the prefix cached and compute only their own tail.
    assert {rid: n for rid, n in steps[1].num_scheduled_tokens.items() if rid.startswith("r") and rid != "r0"} \
        == {"r1": 2, "r2": 2, "r3": 2}
    assert [outputs[f"r{i}"][0].num_cached_tokens for i in range(4)] == [0, 12, 12, 12]
    assert_no_leaks(scheduler)


def test_a_sharer_waits_through_every_chunk_of_a_prefix_computed_in_chunks():
    # A prompt computes at most two blocks a step, and the step has room for both prompts.
    scheduler = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    prefix = [7] * 24  # six full blocks: r0 computes them over three steps
    for i in range(2):
        scheduler.add_request(Request(f"r{i}", prefix + [100 + i, 200 + i], SamplingParams(max_tokens=2),
                                      arrival_time=float(i)))
    outputs, steps = run_all(scheduler)
    # r1 waits while the next block r0 computes is the one its cached prefix ends at, step after step.
    assert [s.num_scheduled_tokens.get("r1", 0) for s in steps[:3]] == [0, 0, 0]
    assert steps[3].num_scheduled_tokens["r1"] == 2
    assert outputs["r1"][0].num_cached_tokens == 24
    assert_no_leaks(scheduler)


def test_abort_waiting_running_and_unknown_frees_everything():
    scheduler = make_scheduler(max_num_seqs=1)
    runner = KVCheckingRunner()
    scheduler.add_request(make_request("running", 9, max_tokens=10, arrival=0))
    scheduler.add_request(make_request("waiting", 9, max_tokens=10, arrival=1))
    step(scheduler, runner)
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 1)
    outs = scheduler.abort(["waiting", "nope", "running"])
    assert [(o.request_id, o.finish_reason) for o in outs] == [("waiting", "abort"), ("running", "abort")]
    assert not scheduler.has_unfinished()
    assert_no_leaks(scheduler)
    assert set(scheduler.schedule().finished_ids) == {"waiting", "running"}
    assert scheduler.update_from_output(SchedulerOutput(), None) == []


def test_abort_between_schedule_and_update_is_harmless():
    scheduler = make_scheduler()
    runner = KVCheckingRunner()
    scheduler.add_request(make_request("a", 8, max_tokens=5))
    scheduled = scheduler.schedule()
    result = runner.execute(scheduled)
    scheduler.abort(["a"])
    assert scheduler.update_from_output(scheduled, result) == []
    assert_no_leaks(scheduler)


def test_requests_that_can_never_fit_are_rejected():
    scheduler = make_scheduler(num_blocks=4)  # 16 tokens
    with pytest.raises(ValueError, match="20 tokens.*holds 16"):
        scheduler.add_request(make_request("big", 12, max_tokens=8))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", 4))
        scheduler.add_request(make_request("a", 4))
    # the context window caps what a request can grow to: 8 tokens fit in 16
    make_scheduler(num_blocks=4, max_model_len=8).add_request(make_request("capped", 4, max_tokens=100))


def test_random_workload_with_priorities_aborts_and_a_tight_cache():
    rng = random.Random(7)
    scheduler = make_scheduler(num_blocks=24, max_num_batched_tokens=24, max_num_seqs=6)
    runner = KVCheckingRunner()
    router_view: set[int] = set()
    shared = [rng.randrange(500) for _ in range(12)]
    expected: dict[str, int] = {}
    outputs: dict[str, list[EngineCoreOutput]] = defaultdict(list)
    for t in range(600):
        if t < 60 and rng.random() < 0.5:
            rid, n = f"r{t}", rng.randrange(1, 30)
            prefix = shared[: rng.randrange(13)] if rng.random() < 0.5 else []
            prompt = prefix + [rng.randrange(500) for _ in range(n)]
            expected[rid] = rng.randrange(1, 30)
            sampling = SamplingParams(max_tokens=expected[rid])
            request = Request(rid, prompt, sampling, priority=rng.randrange(3), arrival_time=t)
            scheduler.add_request(request)
        if rng.random() < 0.03 and expected:
            victim = rng.choice(sorted(expected))
            for out in scheduler.abort([victim]):
                outputs[victim].append(out)
                expected[victim] = -1
        _, outs = step(scheduler, runner)
        for out in outs:
            outputs[out.request_id].append(out)
        for event in scheduler.kv.take_events():
            if event.kind == "stored":
                router_view.update(event.block_hashes)
            elif event.kind == "removed":
                router_view.difference_update(event.block_hashes)
        assert len(router_view) == scheduler.kv.num_cached_blocks
        if t >= 60 and not scheduler.has_unfinished():
            break
    assert not scheduler.has_unfinished()
    assert scheduler.num_preemptions > 0
    for rid, n in expected.items():
        assert outputs[rid][-1].finished
        if n >= 0:
            assert tokens(outputs[rid]) == list(range(FIRST_OUTPUT_TOKEN, FIRST_OUTPUT_TOKEN + n))
    assert_no_leaks(scheduler)


# --- decode_steps: many pure-decode steps at once (the twin's fast-forward) -------------------


def decoding_pair(num_blocks: int, max_tokens: list[int], **sampling) -> tuple[Scheduler, Scheduler]:
    """Two identical schedulers whose requests (sharing a cached prefix) have all prefilled."""
    pair = []
    for _ in range(2):
        scheduler = make_scheduler(num_blocks=num_blocks, max_num_batched_tokens=256)
        shared = [7] * (3 * BS)
        for i, limit in enumerate(max_tokens):
            scheduler.add_request(Request(f"r{i}", shared + [i + 1] * (i + 2), SamplingParams(max_tokens=limit, **sampling)))
        while scheduler.num_waiting or any(r.num_output_tokens == 0 for r in scheduler._running):
            step = scheduler.schedule()
            scheduler.update_from_output(step, ModelRunnerOutput({c.request.request_id: 5 for c in step.chunks}))
        pair.append(scheduler)
    return pair[0], pair[1]


def single_steps(scheduler: Scheduler, num_steps: int, token: int) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = defaultdict(list)
    for _ in range(num_steps):
        step = scheduler.schedule()
        assert not step.preempted_ids
        for out in scheduler.update_from_output(step, ModelRunnerOutput({c.request.request_id: token for c in step.chunks})):
            tokens[out.request_id] += out.new_token_ids
    return dict(tokens)


def snapshot(scheduler: Scheduler) -> tuple:
    kv = scheduler.kv
    requests = [(r.request_id, r.num_computed_tokens, r.all_token_ids, r.status) for r in scheduler._running]
    tables = {rid: (list(s.block_ids), list(s.hashes), s.num_cached_blocks) for rid, s in kv._requests.items()}
    return (requests, tables, kv._ref_counts, kv._hash_to_block, list(kv._evictable), kv._fresh,
            scheduler._finished_ids, kv.take_events())


def test_decode_steps_equals_as_many_single_steps():
    batched, stepped = decoding_pair(num_blocks=64, max_tokens=[40, 60, 50])
    done, outputs = batched.decode_steps(30, token_id=9)
    assert done == 30
    assert {o.request_id: o.new_token_ids for o in outputs} == single_steps(stepped, 30, token=9)
    assert snapshot(batched) == snapshot(stepped)


def test_decode_steps_stops_after_a_request_finishes():
    batched, stepped = decoding_pair(num_blocks=64, max_tokens=[40, 12, 50])
    done, outputs = batched.decode_steps(30, token_id=9)
    assert done == 11  # r1 had 1 of its 12 tokens
    assert [o.finish_reason for o in outputs] == [None, "length", None]
    single_steps(stepped, done, token=9)
    assert snapshot(batched) == snapshot(stepped)
    assert batched.num_running == 2


def test_decode_steps_stops_at_a_stop_token_after_min_tokens():
    batched, stepped = decoding_pair(num_blocks=64, max_tokens=[40, 40], stop_token_ids=(9,), min_tokens=6)
    done, outputs = batched.decode_steps(30, token_id=9)
    # r0 already has 2 tokens, r1 one: r0's 7th token is the first that may stop it
    assert done == 5 and [o.finish_reason for o in outputs] == ["stop", None]
    single_steps(stepped, done, token=9)
    assert snapshot(batched) == snapshot(stepped)


def test_decode_steps_stops_before_a_step_that_would_preempt():
    batched, stepped = decoding_pair(num_blocks=30, max_tokens=[60, 60, 60])
    done, _ = batched.decode_steps(59, token_id=9)
    assert 0 < done < 59
    single_steps(stepped, done, token=9)
    assert snapshot(batched) == snapshot(stepped)
    assert batched.schedule().preempted_ids  # the very next real step preempts


def test_decode_steps_refuses_a_state_that_is_not_pure_decode():
    batched, _ = decoding_pair(num_blocks=64, max_tokens=[40])
    batched.add_request(make_request("late", 6))
    with pytest.raises(ValueError, match="pure-decode"):
        batched.decode_steps(4, token_id=9)
