import dataclasses

import pytest

from tokenfactory.engine.config import ModelConfig
from tokenfactory.engine.outputs import ScheduledChunk, SchedulerOutput
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.twin.cost_model import LLAMA_3_70B, BatchShape, CostModel, default_model, shape_of, step_shape
from tokenfactory.twin.hardware import HARDWARE, get_hardware


@pytest.fixture(scope="module")
def h200() -> CostModel:
    return CostModel(default_model(), get_hardware("h200"))


def test_llama_3_8b_has_8b_parameters(h200):
    assert 7.9e9 < h200.total_params < 8.1e9
    assert h200.kv_bytes_per_token == 131072  # 32 layers x 8 KV heads x 128 x K,V x 2 bytes


@pytest.mark.parametrize("batch", [1, 2, 8, 32, 64, 128, 256])
def test_decode_sits_between_the_bandwidth_bound_and_twice_it(h200, batch):
    context = 2048
    cost = h200.batch_cost(decodes=[context] * batch)
    bytes_moved = h200.weight_bytes + h200.kv_bytes_per_token * batch * (context + 2)
    bandwidth_bound = bytes_moved / h200.hardware.hbm_bandwidth
    assert bandwidth_bound <= cost.duration_s <= 2 * bandwidth_bound


def test_decode_step_grows_with_batch_but_per_token_cost_falls(h200):
    small, large = h200.batch_cost(decodes=[1024]), h200.batch_cost(decodes=[1024] * 128)
    assert large.duration_s > small.duration_s
    assert large.duration_s / 128 < small.duration_s / 10


def test_long_prefill_is_compute_bound(h200):
    cost = h200.batch_cost(prefills=[(8192, 0)])
    flops = 2 * h200.layer_params * 8192
    compute_bound = flops / h200.hardware.peak_flops_bf16
    memory_bound = h200.weight_bytes / h200.hardware.hbm_bandwidth
    assert compute_bound > 5 * memory_bound
    assert cost.duration_s >= compute_bound / h200.compute_efficiency
    # attention makes a later chunk of the same prompt dearer than the first
    assert h200.batch_cost(prefills=[(8192, 32768)]).duration_s > cost.duration_s


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_power_stays_between_idle_and_tdp(name):
    model = CostModel(default_model(), get_hardware(name))
    hw = model.hardware
    steps = [model.batch_cost(decodes=[10]), model.batch_cost(prefills=[(4096, 0)])]
    steps.append(model.batch_cost(decodes=[4096] * 64))
    for cost in steps:
        assert hw.idle_w <= cost.power_w <= hw.tdp_w
    busy = model.batch_cost(prefills=[(8192, 0)]).power_w
    assert busy > hw.idle_w + 0.5 * (hw.tdp_w - hw.idle_w)


def test_fp8_and_tensor_parallel_make_decode_faster(h200):
    bf16 = h200.batch_cost(decodes=[2048] * 32).duration_s
    fp8 = dataclasses.replace(h200, precision="fp8").batch_cost(decodes=[2048] * 32).duration_s
    tp2 = dataclasses.replace(h200, tp=2).batch_cost(decodes=[2048] * 32)
    assert fp8 < 0.6 * bf16
    assert tp2.duration_s < bf16
    assert tp2.power_w > h200.batch_cost(decodes=[2048] * 32).power_w  # two GPUs draw


def test_kv_capacity_is_memory_left_after_weights(h200):
    # (141 GiB - 16.06 GB of weights) x 0.9 / 128 KiB per token
    assert h200.kv_capacity_tokens() == 929289
    assert h200.kv_num_blocks(16) == 929289 // 16
    h100 = CostModel(default_model(), get_hardware("h100"))
    assert h100.kv_capacity_tokens() == int((80 * 2**30 - h100.weight_bytes) * 0.9 // 131072)
    assert dataclasses.replace(h200, precision="fp8").kv_capacity_tokens() > 2 * h200.kv_capacity_tokens()
    assert dataclasses.replace(h100, tp=2).kv_capacity_tokens() > 2 * h100.kv_capacity_tokens()


def test_weights_that_do_not_fit_are_refused():
    small = dataclasses.replace(get_hardware("h100"), hbm_capacity=16e9)
    with pytest.raises(ValueError, match="do not fit"):
        CostModel(default_model(), small).kv_capacity_tokens()


def test_bad_settings_are_refused(h200):
    with pytest.raises(ValueError, match="precision"):
        dataclasses.replace(h200, precision="int3")
    with pytest.raises(ValueError, match="tp=3"):
        dataclasses.replace(h200, tp=3)
    with pytest.raises(ValueError, match="unknown hardware"):
        get_hardware("tpu9")


def test_shape_of_counts_attention_pairs():
    assert shape_of([(3, 0)]) == BatchShape(num_tokens=3, attention_pairs=6, kv_read_tokens=3, num_sampled=1,
                                            num_prefill_chunks=1)
    assert shape_of([(1, 10), (1, 20)]) == BatchShape(2, 11 + 21, 32, 2, num_decode_rows=2)
    assert shape_of([(1, 10), (4, 0)]) == BatchShape(5, 11 + 10, 15, 2, num_prefill_chunks=1, num_decode_rows=1)


def priced_one_by_one(model: CostModel, first: BatchShape, max_steps: int, limit: float = float("inf")):
    n, shape, steps, duration, energy = first.num_tokens, first, 0, 0.0, 0.0
    while steps < max_steps:
        shape = BatchShape(n, shape.attention_pairs + n, shape.kv_read_tokens + n, n)
        cost = model.step(shape)
        if duration + cost.duration_s >= limit:
            break
        steps, duration, energy = steps + 1, duration + cost.duration_s, energy + cost.energy_j
    return steps, duration, energy


@pytest.mark.parametrize("name,tp", [("h200", 1), ("h200", 2), ("cpu", 1), ("b200", 1)])
@pytest.mark.parametrize("batch,context", [(1, 100), (32, 2000), (256, 30000), (200, 50)])
def test_a_decode_stretch_in_closed_form_matches_pricing_every_step(name, tp, batch, context):
    model = CostModel(default_model(), get_hardware(name), tp=tp)
    first = shape_of([(1, context)] * batch)
    steps, duration, energy = priced_one_by_one(model, first, 700)
    stretch = model.decode_stretch(first, 700)
    assert stretch.num_steps == steps == 700
    assert stretch.duration_s == pytest.approx(duration, rel=1e-12)
    assert stretch.energy_j == pytest.approx(energy, rel=1e-12)
    limit = 0.37 * duration  # the steps that end strictly within a time limit
    within = model.decode_stretch(first, 700, limit)
    assert within.num_steps == priced_one_by_one(model, first, 700, limit)[0] > 0
    assert within.duration_s < limit
    assert model.decode_stretch(first, 0).num_steps == 0


def test_a_stretch_on_the_attention_compute_roof_matches_pricing_every_step():
    # On the CPU with an FP8 cache a decode's attention is compute bound (the other side of the
    # max the closed form sums); on an H200 it streams the KV.
    for hardware, compute_bound in (("cpu", True), ("h200", False)):
        model = CostModel(default_model(), get_hardware(hardware), "fp8")
        first = shape_of([(1, 10)] * 64)
        peak, bandwidth = model.hardware.peak_flops("fp8"), model.hardware.hbm_bandwidth
        per_token_compute = 4 * 32 * 32 * 128 / (peak * model.compute_efficiency)
        per_token_kv = model.kv_bytes_per_token / (bandwidth * model.kv_bandwidth_efficiency)
        assert (per_token_compute > per_token_kv) == compute_bound
        steps, duration, energy = priced_one_by_one(model, first, 2000)
        stretch = model.decode_stretch(first, 2000)
        assert stretch.duration_s == pytest.approx(duration, rel=1e-12)
        assert stretch.energy_j == pytest.approx(energy, rel=1e-12)


def test_a_mixed_step_pays_its_decodes_kv_reads_on_top_of_its_prefill_gemms(h200):
    # The projections and attention run one after the other: a prefill chunk's compute-bound
    # GEMMs do not hide the decodes' KV streaming, so a mixed step costs about both.
    prefill = h200.batch_cost(prefills=[(2048, 0)])
    decodes = h200.batch_cost(decodes=[4096] * 128)
    mixed = h200.batch_cost(prefills=[(2048, 0)], decodes=[4096] * 128)
    kv_s = h200.kv_bytes_per_token * 128 * 4097 / (h200.hardware.hbm_bandwidth * h200.kv_bandwidth_efficiency)
    assert kv_s > 0.5 * decodes.duration_s  # the decodes alone are mostly KV reads
    # About the prefill (with 128 more GEMM rows) plus the KV reads, give or take the prefill's
    # attention FLOPs, which the KV reads now outlast.
    assert prefill.duration_s + 0.95 * kv_s < mixed.duration_s < prefill.duration_s * 2176 / 2048 + 1.01 * kv_s
    assert mixed.duration_s > max(prefill.duration_s, decodes.duration_s) * 1.3


def test_a_decode_batch_runs_the_cuda_graph_of_the_next_size_up():
    fp8 = CostModel(ModelConfig.from_dict(LLAMA_3_70B), get_hardware("h200"), "fp8")
    graphs = dataclasses.replace(fp8, graph_batch_sizes=(128, 256))

    def gemm_bound(model: CostModel, batch: int) -> float:  # short contexts: the GEMMs dominate
        return model.batch_cost(decodes=[16] * batch).duration_s

    # 215 decodes of a 70B are compute bound: padded to 256 rows, they take as long as 256 do.
    assert gemm_bound(graphs, 215) == pytest.approx(gemm_bound(fp8, 256), rel=0.01)
    assert gemm_bound(graphs, 215) > 1.1 * gemm_bound(fp8, 215)
    assert gemm_bound(graphs, 300) == gemm_bound(fp8, 300)  # above the largest graph: unpadded
    mixed = {"prefills": [(100, 0)], "decodes": [16] * 115}  # a prefill chunk: no graph
    assert graphs.batch_cost(**mixed) == fp8.batch_cost(**mixed)
    first = shape_of([(1, 500)] * 215)
    steps, duration, energy = priced_one_by_one(graphs, first, 300)
    stretch = graphs.decode_stretch(first, 300)
    assert stretch.duration_s == pytest.approx(duration, rel=1e-12)
    assert stretch.energy_j == pytest.approx(energy, rel=1e-12)


def test_efficiencies_above_one_are_refused(h200):
    for name in ("compute_efficiency", "bandwidth_efficiency", "kv_bandwidth_efficiency"):
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(h200, **{name: 1.2})


def test_step_shape_counts_the_runners_padding_and_gathers_only_when_asked():
    def decode(request_id: str, context: int, blocks: list[int]) -> ScheduledChunk:
        request = Request(request_id, [1] * context, SamplingParams(max_tokens=8))
        request.num_computed_tokens = context  # its next token is the step's one query
        return ScheduledChunk(request, 1, blocks)

    # Contexts 20, 40 and 70 (ends 21, 41, 71) with 16-token blocks; the first block is shared by all
    # three rows, so it is read once; each row's own blocks are padded to the longest row's four.
    rows = [decode("a", 20, [7, 1]), decode("b", 40, [7, 2, 3]), decode("c", 70, [7, 4, 5, 6, 8])]
    sched = SchedulerOutput(rows)
    plain = step_shape(sched)
    assert (plain.attention_pairs, plain.kv_read_tokens) == (21 + 41 + 71,) * 2
    assert (plain.decode_extra_pairs, plain.decode_extra_reads) == (0, 0)  # what the roofline gets
    padded = step_shape(sched, runner_block_size=16)
    assert padded.decode_extra_pairs == 3 * (1 + 4) * 16 - 133  # every row attends 5 blocks
    assert padded.decode_extra_reads == (1 + 3 * 4) * 16 - 133  # the shared block read once
    assert dataclasses.replace(padded, decode_extra_pairs=0, decode_extra_reads=0) == plain
    # One row alone: nothing shared, padded only to its own last block.
    alone = step_shape(SchedulerOutput(rows[:1]), runner_block_size=16)
    assert alone.decode_extra_pairs == alone.decode_extra_reads == 32 - 21
    # A prefill chunk after a cached prefix gathers whole blocks up to its end; one from the start none.
    tail = Request("t", [1] * 30, SamplingParams(max_tokens=8))
    tail.num_computed_tokens = 20
    fresh = Request("f", [2] * 12, SamplingParams(max_tokens=8))
    mixed = step_shape(SchedulerOutput([ScheduledChunk(tail, 10, [9, 10]), ScheduledChunk(fresh, 12, [11])] + rows[:1]),
                       runner_block_size=16)
    assert (mixed.prefill_gathered_tokens, mixed.num_prefill_gathers) == (32, 1) and step_shape(SchedulerOutput([ScheduledChunk(tail, 10, [9, 10])])) \
        .prefill_gathered_tokens == 0
    assert mixed.decode_extra_pairs == alone.decode_extra_pairs  # the decode row, as alone
