"""`tokenfactory bench transport`: its figures from timings, and the command on both transports."""

from __future__ import annotations

import importlib.util

import pytest

from tokenfactory.bench.transport_bench import (
    Samples,
    SplitTiming,
    StreamTiming,
    paired_ratios,
    percentile,
    report,
    summarize,
)
from tokenfactory.cli import main

TINY_RUN = ["--rounds", "1", "--singles", "1", "--concurrency", "2", "--splits", "1", "--prompt-len", "16",
            "--output-len", "4", "--split-prompt-len", "48"]


def samples(scale: float) -> Samples:
    """Timings of one transport, every latency `scale` times the base ones."""
    single = StreamTiming(0.010 * scale, (0.005 * scale,) * 3, (1, 2, 3, 4))
    burst = [StreamTiming(0.020 * scale, (0.008 * scale,) * 3, (1, 2, 3, 4)) for _ in range(2)]
    split = SplitTiming(0.030 * scale, 0.012 * scale, 1000, (5, 6, 7, 8))
    return Samples([single], [(burst, 0.050 * scale)], [split], num_steps=10, step_s=0.040 * scale)


def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_figures_and_the_ray_over_zmq_column_from_paired_rounds():
    zmq, ray = summarize(samples(1.0)), summarize(samples(2.0))
    assert zmq["TTFT p50, 1 stream"] == pytest.approx(0.010)
    assert zmq["tokens/s, 1 stream"] == pytest.approx(4 / 0.025)
    assert zmq["tokens/s, N streams"] == pytest.approx(8 / 0.050)
    assert zmq["split: KV hand-off to first decode token, p50"] == pytest.approx(0.012)
    assert zmq["engine step, mean"] == pytest.approx(0.004)
    # Ray 2x slower in two rounds of three, 3x faster in one (a busy spell on the ZMQ side): the median pair.
    ratios = paired_ratios([samples(2.0), samples(2.0), samples(1.0)], [samples(1.0), samples(1.0), samples(3.0)])
    assert ratios["ITL p50, N streams"] == pytest.approx(2.0) and ratios["tokens/s, N streams"] == pytest.approx(0.5)
    lines = report({"zmq": zmq, "ray": ray}, ratios)
    assert lines[0].split() == ["zmq", "ray", "ray/zmq"]
    printed = {line[:46].strip(): line.split()[-1] for line in lines[1:]}
    assert printed["ITL p50, N streams"] == "2.00" and printed["tokens/s, N streams"] == "0.50"
    assert report({"zmq": zmq})[0].split() == ["zmq"]  # without Ray: no ratio column


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_both_transports_serve_the_same_tokens_and_print_their_ratios(tiny_model_dir, capsys):
    assert main(["bench", "transport", "--model", str(tiny_model_dir), *TINY_RUN]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "greedy outputs identical across transports: 4/4 requests" in lines
    assert lines[-1].startswith("ratio (ray / zmq, median of 1 paired rounds): TTFT p50, 1 stream ")
    handoff = next(line for line in lines if line.startswith("split: KV hand-off"))
    assert float(handoff.split()[-1]) > 0
