import argparse

import pytest

from tokenfactory.bench import power_bench
from tokenfactory.twin.workloads import AZURE_TRACE, TraceRequest

needs_trace = pytest.mark.skipif(not AZURE_TRACE.is_file(), reason="Azure conversation trace not present")


def parse(add, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(list(argv))


def test_tiling_repeats_the_trace_with_unique_prompts_until_the_end():
    trace = [TraceRequest(0.0, 10, 2, uid=0), TraceRequest(1.0, 20, 3, uid=1), TraceRequest(3.0, 30, 4, uid=2)]
    tiled = power_bench.tile(trace, 10.0)
    assert [r.arrival_time for r in tiled] == [0.0, 1.0, 3.0, 4.5, 5.5, 7.5, 9.0]
    assert len({r.uid for r in tiled}) == len(tiled)
    assert [r.input_length for r in tiled[3:6]] == [10, 20, 30]
    with pytest.raises(ValueError):
        power_bench.tile([], 1.0)


def test_a_missing_trace_is_skipped_with_a_message(tmp_path, capsys):
    args = parse(power_bench.add_arguments, "--trace", str(tmp_path / "absent.csv"))
    assert power_bench.main(args) == 0
    assert "skipped" in capsys.readouterr().out


QUICK = ("--limit", "150", "--model", "8b", "--tp", "1", "--speedup", "5")


@needs_trace
def test_grid_cut_bench_reports_power_priority_and_losses(capsys):
    args = parse(power_bench.add_arguments, *QUICK, "--hours", "0.005", "--ramp-min", "0.05", "--lead-min", "0.1")
    assert power_bench.main(args) == 0
    out = capsys.readouterr().out
    assert "fleet power / budget" in out and "priority SLO attainment" in out
    assert "revenue lost" in out and "tiled" in out


@needs_trace
def test_energy_bench_compares_joules_per_token(capsys):
    args = parse(power_bench.add_energy_arguments, *QUICK)
    assert power_bench.main_energy(args) == 0
    out = capsys.readouterr().out
    assert "energy-aware" in out and "max clock" in out and "joules per token" in out


def test_bad_arguments_are_refused(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n")
    assert power_bench.main(parse(power_bench.add_arguments, "--trace", str(trace), "--cut", "1.5")) == 2
