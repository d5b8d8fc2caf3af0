import dataclasses

import pytest

from tokenfactory.bench.twin_bench import ANCHORS, Anchor, anchor_model, benchmark_scheduler
from tokenfactory.engine.config import ModelConfig, SchedulerConfig
from tokenfactory.twin.cost_model import LLAMA_3_70B, CostModel
from tokenfactory.twin.hardware import get_hardware
from tokenfactory.twin.simulator import Simulator, TwinConfig
from tokenfactory.twin.workloads import TraceRequest


def test_the_benchmark_batch_is_what_fits_whole_and_the_budget_keeps_prefill_in_pace():
    anchor = next(a for a in ANCHORS if a.name == "Llama-3.3-70B 1000/1000")
    model = anchor_model(anchor)
    # (141 GiB - 70.6 GB of FP8 weights) x 0.95 / 160 KiB per token, 2000 tokens a request
    assert model.kv_capacity_tokens() == int((141 * 2**30 - model.weight_bytes) * 0.95 // 163840)
    config = benchmark_scheduler(model, 1000, 1000)
    assert config.max_num_seqs == model.kv_num_blocks(16) // 125 == 234  # 2000 tokens in 16-token blocks
    assert config.max_num_batched_tokens == 2048  # 234 x 2 = 468, raised to trtllm-bench's floor
    small = anchor_model(dataclasses.replace(anchor, model=ANCHORS[0].model))
    config = benchmark_scheduler(small, 2048, 128)
    assert config.max_num_seqs == small.kv_num_blocks(16) // 136 == 955
    assert config.max_num_batched_tokens == 955 * 17  # 1 + 2048 / 128
    assert benchmark_scheduler(small, 128, 128).max_num_seqs == 4096  # trtllm-bench's cap
    assert benchmark_scheduler(small, 128, 128).max_num_batched_tokens == 8192
    assert benchmark_scheduler(small, 2048, 16).max_num_batched_tokens == 32768  # its ceiling
    with pytest.raises(ValueError, match="does not fit"):
        benchmark_scheduler(model, 500_000, 1)


def test_admitting_only_what_fits_whole_avoids_the_recompute_that_slows_a_big_model():
    # A 70B on an H200 cut to 77.5 GB holds ~40k tokens of KV: 200 requests of 100 + 100, a
    # batch where its GEMMs are compute bound. Admitting on the prompt alone runs more, then
    # preempts them as they grow and computes their prompts again, which a bigger batch cannot
    # pay back; the benchmark's batch never preempts and finishes sooner.
    hardware = dataclasses.replace(get_hardware("h200"), hbm_capacity=77.5e9)
    model = CostModel(ModelConfig.from_dict(LLAMA_3_70B), hardware, "fp8", activation_reserve=0.05)
    workload = [TraceRequest(0.0, 100, 100, uid=i) for i in range(400)]

    def run(scheduler: SchedulerConfig):
        return Simulator(TwinConfig(model, num_workers=1, scheduler=scheduler)).run(workload).summary

    greedy = run(SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=1024))
    fitted = run(benchmark_scheduler(model, 100, 100))
    assert fitted.num_preemptions == 0 < greedy.num_preemptions
    assert fitted.output_tokens_per_s > 1.1 * greedy.output_tokens_per_s


def test_the_anchors_span_both_sizes_and_name_the_two_that_are_fitted():
    assert {a.model["num_hidden_layers"] for a in ANCHORS} == {32, 80}
    assert [a.name for a in ANCHORS if "(fit)" in a.name] == ["Llama-3.1-8B 1000/1000 (fit)",
                                                              "Llama-3.1-8B 2048/128 (fit)"]
    assert all(isinstance(a, Anchor) and a.published_tokens_per_s > 0 for a in ANCHORS)
