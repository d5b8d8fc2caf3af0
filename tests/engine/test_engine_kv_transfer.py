"""Disaggregated serving inside the engine: prefill on one `EngineCore`, move the KV, decode on
another; greedy tokens must match a request served whole on one engine."""

from __future__ import annotations

import dataclasses
import random

import pytest

from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.engine import EngineCore
from tokenfactory.engine.outputs import KVTransfer
from tokenfactory.engine.request import Request, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> EngineConfig:
    return EngineConfig.from_pretrained(tiny_model_dir, max_model_len=512,
                                        cache=CacheConfig(block_size=8, num_blocks=64))


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 3000) for _ in range(length)]


def run_to_end(core: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def prefill_and_export(core: EngineCore, request_id: str, ids: list[int]) -> tuple[list[int], KVTransfer]:
    core.prefill_only(Request(request_id, ids, GREEDY))
    first = run_to_end(core)[request_id]
    return first, core.export_kv(request_id)


def all_blocks_free(core: EngineCore) -> bool:
    return core.kv.num_free_blocks == core.kv.num_blocks


def test_split_request_decodes_the_same_tokens_as_a_whole_one(config):
    whole, prefill, decode = EngineCore(config), EngineCore(config), EngineCore(config)
    ids = prompt(0, 37)  # a partial last block travels too
    whole.add_request(Request("r", ids, GREEDY))
    expected = run_to_end(whole)["r"]

    first, transfer = prefill_and_export(prefill, "r", ids)
    assert first == expected[:1]
    assert transfer.num_computed_tokens == 37 and transfer.shape[0] == 5
    assert decode.import_kv(Request("r", ids, GREEDY), transfer)
    assert decode.scheduler.num_running == 1  # admitted running: the next step decodes
    assert first + run_to_end(decode)["r"] == expected
    assert all_blocks_free(prefill) and all_blocks_free(decode)


def test_prefix_hits_on_either_side_keep_the_tokens(config):
    whole, prefill, decode = EngineCore(config), EngineCore(config), EngineCore(config)
    shared = prompt(1, 24)
    ids = shared + prompt(2, 13)
    whole.add_request(Request("r", ids, GREEDY))
    expected = run_to_end(whole)["r"]
    # The prefill worker already holds the shared prefix; the decode worker learns it too.
    prefill_and_export(prefill, "warm", shared + prompt(3, 5))
    decode.add_request(Request("warm", shared + prompt(4, 3), GREEDY))
    run_to_end(decode)

    first, transfer = prefill_and_export(prefill, "r", ids)
    assert transfer.num_cached_tokens == 24
    assert decode.import_kv(Request("r", ids, GREEDY), transfer)
    assert decode.kv.prefix_cache_hits >= 24  # the decode side reused its own copy of the prefix
    assert first + run_to_end(decode)["r"] == expected
    assert all_blocks_free(prefill) and all_blocks_free(decode)


def test_imported_request_without_room_recomputes_to_the_same_tokens(config):
    ids = prompt(5, 30)
    whole = EngineCore(config)
    whole.add_request(Request("r", ids, GREEDY))
    expected = run_to_end(whole)["r"]
    first, transfer = prefill_and_export(EngineCore(config), "r", ids)
    busy = EngineCore(dataclasses.replace(config, scheduler=SchedulerConfig(max_num_seqs=1)))
    busy.add_request(Request("other", prompt(7, 10), GREEDY))
    busy.step()  # "other" runs: no seat for an imported request
    assert not busy.import_kv(Request("r", ids, GREEDY), transfer)
    assert first + run_to_end(busy)["r"] == expected  # it waited, then recomputed its prompt
    assert all_blocks_free(busy)


def test_export_of_an_unknown_or_taken_request_is_a_clear_error(config):
    core = EngineCore(config)
    with pytest.raises(ValueError, match="no KV to export for request 'nope'"):
        core.export_kv("nope")
    prefill_and_export(core, "r", prompt(8, 20))
    with pytest.raises(ValueError, match="already exported"):
        core.export_kv("r")


def test_a_transfer_for_another_prompt_or_shape_is_refused(config):
    prefill, decode = EngineCore(config), EngineCore(config)
    ids = prompt(9, 20)
    _, transfer = prefill_and_export(prefill, "r", ids)
    with pytest.raises(ValueError, match="another prompt"):
        decode.import_kv(Request("r", prompt(10, 20), GREEDY), transfer)
    bad = KVTransfer(**{**{f: getattr(transfer, f) for f in transfer.__struct_fields__}, "block_size": 16})
    with pytest.raises(ValueError, match="does not fit"):
        decode.import_kv(Request("r2", ids, GREEDY), bad)
    assert all_blocks_free(decode)
