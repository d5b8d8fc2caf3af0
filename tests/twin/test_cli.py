import argparse
import json

from tokenfactory.engine.config import CacheConfig, EngineConfig
from tokenfactory.twin.cli import add_replay_arguments, main
from tokenfactory.twin.profile import QUICK_GRID, profile_engine


def test_replay_prints_a_metrics_table_for_a_small_trace(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 100 * i, "input_length": 900, "output_length": 12, "hash_ids": [0, 1 + i]}
        for i in range(6)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--trace", str(trace), "--workers", "2", "--router", "least_loaded", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "TTFT (s)" in out and "$ per million tokens" in out
    assert "5 / 0" in out  # finished / rejected
    assert "simulated s per wall s" in out


def test_replay_refuses_a_missing_trace(tmp_path, capsys):
    assert main(["--trace", str(tmp_path / "absent.jsonl")]) == 2
    assert "trace not found" in capsys.readouterr().out


def test_replay_arguments_have_the_documented_defaults():
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    args = parser.parse_args([])
    assert (args.hardware, args.workers, args.tp, args.precision, args.speedup, args.router) == (
        None, 16, 1, "bf16", 1.0, "round_robin"  # None: an H200, or the profiled machine with --profile
    )
    assert args.profile is None
    assert args.trace.name == "mooncake_conversation_trace.jsonl"


def test_replay_runs_a_closed_loop_workload_and_draws_its_plots(tmp_path, capsys):
    plots = tmp_path / "plots"
    argv = ["--workload", "closed-loop", "--concurrency", "4", "--num-requests", "12", "--input-len", "300",
            "--output-len", "20", "--workers", "2", "--router", "kv", "--plots", str(plots)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "12 / 0" in out and "wrote" in out
    for name in ("latency_cdf.png", "power.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_runs_gamma_and_agentic_workloads(capsys):
    assert main(["--workload", "gamma", "--rate", "20", "--num-requests", "30", "--burstiness", "3",
                 "--workers", "2"]) == 0
    assert "30 / 0" in capsys.readouterr().out
    assert main(["--workload", "agentic", "--num-requests", "3", "--rate", "2", "--turns", "2",
                 "--workers", "2", "--router", "kv"]) == 0
    assert "prefix hit rate" in capsys.readouterr().out


def test_replay_refuses_bad_workload_parameters(capsys):
    assert main(["--workload", "poisson", "--rate", "0", "--num-requests", "5"]) == 2
    assert "rate" in capsys.readouterr().out


def test_replay_prices_steps_from_a_profile_of_the_live_engine(tiny_model_dir, tmp_path, capsys):
    profile = profile_engine(EngineConfig.from_pretrained(tiny_model_dir, cache=CacheConfig(num_blocks=64)),
                             QUICK_GRID, threads=1)
    path = tmp_path / "step_profile.json"
    profile.save(path)
    workload = ["--workload", "poisson", "--rate", "20", "--num-requests", "20", "--input-len", "40", "--output-len", "8"]
    assert main(["--profile", str(path), "--workers", "2", *workload]) == 0
    out = capsys.readouterr().out
    assert "2 x the engine profiled in step_profile.json" in out and "20 / 0" in out
    # One engine per worker at its own block size: TP and another block size contradict the profile.
    assert main(["--profile", str(path), "--tp", "2", *workload]) == 2
    assert "--tp must be 1" in capsys.readouterr().out
    assert main(["--profile", str(path), "--block-size", "32", *workload]) == 2
    assert "16-token KV blocks" in capsys.readouterr().out
    assert main(["--profile", str(tmp_path / "absent.json"), *workload]) == 2
