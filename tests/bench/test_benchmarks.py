"""The benchmark commands run end to end on small settings and print their ratio lines."""

from __future__ import annotations

import json

import pytest

from tokenfactory.cli import main


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_bench_engine_matches_transformers_and_prints_the_ratio(tiny_model_dir, tmp_path, capsys, load_format):
    out = tmp_path / "result.json"
    argv = ["bench", "engine", "--model", str(tiny_model_dir), "--num-requests", "6", "--prefix-len", "48",
            "--question-len", "4", "12", "--output-len", "2", "10", "--json", str(out),
            "--load-format", load_format]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "greedy outputs identical for 6/6 requests" in printed
    assert printed.strip().splitlines()[-1].startswith("ratio (tokenfactory / transformers output tokens/s)")
    result = json.loads(out.read_text())
    assert result["ours"]["extra"]["prefix_hit_rate"] > 0  # the shared prefix was computed once
    assert result["ratio"] > 0


def test_bench_serve_delivers_every_token_over_http(tiny_model_dir, capsys):
    argv = ["bench", "serve", "--model", str(tiny_model_dir), "--concurrency", "4", "--prompt-len", "16",
            "--output-len", "8"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratio (served / engine alone, tokens/s)")
    assert "32 tokens" in lines[2]


def test_bench_decode_reports_a_fraction_of_the_bandwidth_bound(tiny_model_dir, capsys):
    argv = ["bench", "decode", "--model", str(tiny_model_dir), "--device", "cpu", "--concurrency", "1", "4",
            "--context", "32", "--steps", "4"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == ["concurrency    1", "concurrency    4"]
    assert all("of measured copy bandwidth" in line for line in lines[1:])


def test_bench_overhead_reports_gateway_router_and_transfer_costs(tiny_model_dir, capsys):
    assert main(["bench", "overhead", "--model", str(tiny_model_dir), "--requests", "3", "--prompt-len", "16",
                 "--route-lens", "64", "256", "--transfer-lens", "32", "64", "--neighbour", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines.pop(0).startswith("with a noisy neighbour (seed 1)")
    assert lines[0].startswith("TTFT p50, 3 two-token requests of 16 tokens")
    assert "the same work on both sides" in lines[1]  # the premise of the comparison, shown
    assert sum(line.startswith("router decision") for line in lines) == 2
    assert sum(line.startswith("KV transfer") for line in lines) == 2
    assert lines[-1].startswith("gateway + router overhead at p50:")
