import argparse
import json

from tokenfactory.bench import twin_bench
from tokenfactory.bench.twin_bench import ANCHORS, Anchor, offline_throughput
from tokenfactory.cli import build_parser
from tokenfactory.twin.cost_model import LLAMA_3_8B, CostModel, default_model
from tokenfactory.twin.hardware import get_hardware


def run(argv: list[str]) -> int:
    args = build_parser(["bench", "twin"]).parse_args(["bench", "twin", *argv])
    return args.func(args)


def test_the_speed_bench_replays_a_trace_and_gives_a_verdict(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 500 * i, "input_length": 1500, "output_length": 40, "hash_ids": [0, 1, 2 + i]}
            for i in range(12)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(["--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "12 requests" in out and "simulated s per wall s" in out
    assert "PASS" in out  # a dozen requests take well under 30 s
    assert run(["--trace", str(trace), "--limit", "6"]) == 0
    assert "scaled to the whole trace" in capsys.readouterr().out
    assert run(["--trace", str(tmp_path / "absent.jsonl")]) == 2


def test_a_scaled_down_day_runs_on_one_pod(capsys):
    assert run(["--day", "--limit", "300"]) == 0
    out = capsys.readouterr().out
    assert "300 of 300 requests finished" in out and "16 H200s (1 pods of 16" in out and "1 at once" in out
    assert "no verdict" in out


def test_offline_throughput_is_bound_by_the_decode_roofline():
    model = CostModel(default_model(), get_hardware("h200"), "fp8")
    anchor = Anchor("small", LLAMA_3_8B, 200, 100, 64, 1.0, "test")
    tokens_per_s = offline_throughput(model, anchor)
    # No faster than 64 sequences decoding with weights streamed at full bandwidth every step.
    ceiling = 64 / (model.weight_bytes / model.hardware.hbm_bandwidth)
    assert 0.3 * ceiling < tokens_per_s < ceiling
    assert {a.model["num_hidden_layers"] for a in ANCHORS} == {32, 80}


def test_the_bench_refuses_a_bad_limit(capsys):
    assert twin_bench.main(argparse.Namespace(limit=0, calibration=False, day=False, trace="x", jobs=1)) == 2
    assert twin_bench.main(argparse.Namespace(limit=None, calibration=False, day=True, trace="x", jobs=0)) == 2
