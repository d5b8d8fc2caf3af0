"""`tokenfactory bench constrained` runs end to end on small settings and prints its verdict."""

from __future__ import annotations

import json

from tokenfactory.cli import main


def test_bench_constrained_compares_equal_token_counts_and_prints_the_verdict(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["bench", "constrained", "--model", str(tiny_model_dir), "--num-requests", "4", "--prompt-len", "16",
            "--max-tokens", "80", "--repeats", "2", "--json", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    checked = [line for line in lines if "replies ended by themselves and parse" in line]
    assert len(checked) == 2
    assert all(not line.split(":")[1].strip().startswith("0/") for line in checked)  # some replies were checked
    assert lines[-1].startswith(("PASS: constrained / unconstrained", "MISS: constrained / unconstrained"))
    result = json.loads(out.read_text())
    assert set(result) == {"json_schema", "tool"}
    for mode in result.values():
        assert mode["output_tokens"] > 4 and mode["ratio"] > 0 and mode["runs"] == 2
        assert mode["grammar_ms_per_step"] > 0  # the constrained runs did grammar work


def test_bench_constrained_over_http_compares_through_a_live_server(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "http.json"
    argv = ["bench", "constrained", "--http", "--model", str(tiny_model_dir), "--num-requests", "3",
            "--prompt-len", "12", "--max-tokens", "60", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("workload over HTTP: 3 concurrent chat completions")
    checked = [line for line in lines if "replies ended by themselves and parse" in line]
    assert len(checked) == 2 and all(not line.split(":")[1].strip().startswith("0/") for line in checked)
    assert lines[-1].startswith(("PASS: constrained / unconstrained output tokens/s over HTTP",
                                 "MISS: constrained / unconstrained output tokens/s over HTTP"))
    result = json.loads(out.read_text())
    assert set(result) == {"json_schema", "tool"}
    for mode in result.values():
        assert mode["output_tokens"] > 3 and mode["ratio"] > 0 and mode["runs"] == 1
        assert mode["steps"] > 0 and mode["unconstrained_steps"] > 0
