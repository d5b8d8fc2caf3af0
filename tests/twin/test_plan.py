import argparse
import base64
import re
from pathlib import Path

import pytest

from tokenfactory.control.tiers import builtin_config, price_usage
from tokenfactory.twin.hardware import HARDWARE
from tokenfactory.twin.metrics import SLO
from tokenfactory.twin.plan import (
    Candidate,
    HardwareError,
    Setup,
    add_arguments,
    candidates,
    gpu_budget,
    load_hardware_file,
    main,
    measure,
    pareto_frontier,
    tier_costs,
)
from tokenfactory.twin.workloads import AgenticSessions, LengthDistribution, poisson_workload

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_plan(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return main(parser.parse_args(list(argv)))


def test_a_hardware_file_overrides_known_chips_field_by_field_and_adds_new_ones(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text(
        "h200:\n  price_per_hour: 2.25\n  idle_w: 90\n"
        "lab-gpu:\n  name: Lab GPU\n  peak_flops_bf16: 5.0e+14\n  peak_flops_fp8: 1.0e+15\n"
        "  hbm_bandwidth: 2.0e+12\n  hbm_capacity: 9.6e+10\n  interconnect_bandwidth: 4.0e+11\n"
        "  tdp_w: 500\n  idle_w: 50\n  price_per_hour: 1.5\n"
    )
    catalog = load_hardware_file(path)
    assert catalog["h200"].price_per_hour == 2.25 and catalog["h200"].idle_w == 90
    assert catalog["h200"].hbm_bandwidth == HARDWARE["h200"].hbm_bandwidth  # untouched fields stay
    assert catalog["lab-gpu"].hbm_capacity == 96e9
    assert HARDWARE["h200"].price_per_hour != 2.25  # the built-in catalog is not changed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("h200:\n  price_per_hour: -1\n", "h200.price_per_hour: Input should be greater than or equal to 0"),
        ("h200:\n  watts: 700\n", "h200.watts: Extra inputs are not permitted"),
        ("h200:\n  tdp_w: lots\n", "h200.tdp_w"),
        ("newchip:\n  tdp_w: 300\n", "needs every field; missing: name, peak_flops_bf16"),
        ("h200:\n  idle_w: 800\n", "idle_w (800.0) exceeds tdp_w (700"),
        ("- h200\n", "expected a mapping"),
        ("h200: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_bad_hardware_file_says_where_and_why(tmp_path, text, message):
    path = tmp_path / "hw.yaml"
    path.write_text(text)
    with pytest.raises(HardwareError) as error:
        load_hardware_file(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_a_missing_hardware_file_is_a_clear_error(tmp_path):
    with pytest.raises(HardwareError, match="cannot read hardware file"):
        load_hardware_file(tmp_path / "absent.yaml")


def test_the_grid_holds_every_split_of_every_tensor_parallel_layout():
    grid = candidates(4, [1, 2], None, [256], [2048, 8192], ["kv"])
    layouts = {(c.tp, c.layout) for c in grid}
    assert layouts == {(1, "aggregated"), (1, "1P:3D"), (1, "2P:2D"), (1, "3P:1D"), (2, "aggregated"), (2, "1P:1D")}
    assert len(grid) == 6 * 2  # two token budgets each
    assert all(c.num_gpus == 4 for c in grid)
    conditional = candidates(4, [1], [0.5], [256], [8192], ["kv"], conditional=True)
    assert [c.layout for c in conditional] == ["aggregated", "2P:2D", "2P:2D conditional"]


def test_a_power_budget_buys_the_gpus_it_can_feed_at_tdp():
    h200 = HARDWARE["h200"]  # 700 W
    assert gpu_budget(None, 10.0, h200) == 14
    assert gpu_budget(None, 10.0, h200, pue=1.4) == 10
    assert gpu_budget(8, 10.0, h200) == 8
    with pytest.raises(ValueError, match="does not power one"):
        gpu_budget(None, 0.5, h200)


def test_the_frontier_keeps_only_points_nothing_beats_on_both_axes():
    points = [(10, 100), (20, 90), (15, 80), (30, 50), (25, 40), (5, 100), (30, 60)]
    frontier = pareto_frontier(points, lambda p: p[0], lambda p: p[1])
    assert frontier == [(10, 100), (20, 90), (30, 60)]


def test_plan_prints_the_best_configurations_and_writes_the_frontier_png_and_html(tmp_path, capsys):
    out = tmp_path / "report"
    assert run_plan("--workload", "poisson", "--rate", "4", "--input-len", "1500", "--output-len", "40", "--limit", "24",
                    "--gpus", "2", "--tp", "1", "--speedups", "1", "3", "--slo-itl", "0.1", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "best by goodput per GPU" in printed and "Pareto frontier" in printed
    assert "aggregated TP1" in printed and "1P:1D TP1" in printed
    png = (out / "plan.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    page = (out / "plan.html").read_text()
    assert base64.b64encode(png).decode("ascii") in page  # embedded: the page stands alone
    assert re.findall(r"(?:src|href)=", page) == ["src="]  # the image, and nothing it would fetch
    assert "Cost per tier" not in page  # no --tiers, no tier section
    assert page.count("<tr") > 4 and "H200 SXM" in page and "$3.50/GPU-h" in page


def test_an_overridden_price_and_power_reach_the_figures(tmp_path):
    hardware = tmp_path / "hw.yaml"
    hardware.write_text("h200:\n  price_per_hour: 7.0\n  tdp_w: 1400\n  idle_w: 150\n")
    catalog = load_hardware_file(hardware)
    workload = poisson_workload(5.0, 12, LengthDistribution(800), LengthDistribution(30))
    candidate = Candidate(tp=1, num_workers=1)
    listed = measure(candidate, 1.0, workload, Setup(HARDWARE["h200"]))
    overridden = measure(candidate, 1.0, workload, Setup(catalog["h200"]))
    assert overridden.usd_per_million_tokens == pytest.approx(2 * listed.usd_per_million_tokens)
    assert overridden.joules_per_token == pytest.approx(2 * listed.joules_per_token)
    assert overridden.provisioned_kw == 1.4
    with_power = measure(candidate, 1.0, workload, Setup(catalog["h200"], usd_per_kwh=0.1, pue=1.5))
    energy_usd = overridden.joules_per_token * 1e6 / 3.6e6 * 1.5 * 0.1
    assert with_power.usd_per_million_tokens == pytest.approx(overridden.usd_per_million_tokens + energy_usd)


def test_plan_refuses_bad_inputs_with_a_message(tmp_path, capsys):
    bad = tmp_path / "hw.yaml"
    bad.write_text("h200:\n  tdp_w: -5\n")
    assert run_plan("--workload", "poisson", "--hardware-file", str(bad), "--out", str(tmp_path)) == 2
    assert "h200.tdp_w" in capsys.readouterr().out
    assert run_plan("--workload", "poisson", "--hardware", "tpu9", "--out", str(tmp_path)) == 2
    assert "unknown hardware 'tpu9'" in capsys.readouterr().out
    assert run_plan("--trace", str(tmp_path / "absent.csv"), "--out", str(tmp_path)) == 2
    assert "trace not found" in capsys.readouterr().out


def test_a_candidate_names_its_layout():
    assert Candidate(tp=2, num_workers=4).layout == "aggregated"
    assert Candidate(tp=1, num_workers=8, num_prefill=6, conditional=True).layout == "6P:2D conditional"
    assert Candidate(tp=2, num_workers=4, num_prefill=1).num_gpus == 8


def test_the_example_hardware_file_is_valid():
    catalog = load_hardware_file(Path(__file__).resolve().parents[2] / "examples" / "hardware.yaml")
    assert catalog["h200"].price_per_hour < HARDWARE["h200"].price_per_hour
    assert "lab-accelerator" in catalog


def agent_tasks(rate: float, num_tasks: int = 10) -> AgenticSessions:
    return AgenticSessions(num_tasks, rate, turns=LengthDistribution(3), first_prompt=LengthDistribution(3000),
                           tool_output=LengthDistribution(800), output=LengthDistribution(60), think_s=0.5, seed=4)


def test_an_agentic_workload_runs_afresh_for_every_point():
    workload = agent_tasks(4.0)
    first = measure(Candidate(tp=1, num_workers=1), 1.0, workload, Setup(HARDWARE["h200"]))
    again = measure(Candidate(tp=1, num_workers=1), 1.0, workload, Setup(HARDWARE["h200"]))
    assert first.summary.num_requests > 10  # every task's later turns came too
    assert again.summary == first.summary  # the template was not used up by the first run
    assert first.usage.prompt_tokens > first.usage.cached_tokens > 0  # each turn re-reads the last one's prefix


def test_each_tier_costs_the_cheapest_point_where_its_own_slo_holds():
    tiers = builtin_config()
    setup = Setup(HARDWARE["h200"], tier_slos=tuple((name, SLO(spec.slo.ttft_s, spec.slo.itl_s))
                                                    for name, spec in tiers.tiers.items()))
    points = [measure(Candidate(tp=1, num_workers=1), speedup, agent_tasks(speedup, num_tasks=30), setup)
              for speedup in (1.0, 32.0)]
    light, heavy = points
    assert heavy.usd_per_million_tokens < light.usd_per_million_tokens  # a busier fleet makes cheaper tokens
    assert heavy.tier_attainment["flex"] >= 0.9 > heavy.tier_attainment["priority"]  # 0.5 s TTFT fails there
    costs = {c.tier: c for c in tier_costs(points, tiers, ["flex", "priority"], 0.9)}
    assert costs["flex"].point is heavy and costs["priority"].point is light
    assert costs["flex"].usd_per_million_tokens < costs["priority"].usd_per_million_tokens
    # The price side: the tier's own prices on that point's tokens, per million output tokens.
    usage = light.usage
    priced = price_usage(tiers.tiers["priority"], "default", usage) * 1e6 / usage.completion_tokens
    assert costs["priority"].price_usd_per_million == pytest.approx(priced)
    assert tier_costs(points, tiers, ["priority"], 1.01)[0].point is None  # no point can hold it


def test_plan_takes_the_agentic_workload_and_prints_each_tiers_cost(tmp_path, capsys):
    assert run_plan("--workload", "agentic", "--limit", "6", "--rate", "1", "--turns", "2", "--fanout-prob", "0.5",
                    "--task-prompt-len", "600", "--tool-output-len", "200", "--output-len", "30", "--think", "0.5",
                    "--gpus", "1", "--tp", "1", "--speedups", "1", "--tiers", "flex", "priority",
                    "--out", str(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "cost per tier" in printed
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in printed.splitlines()
            if line.startswith(("│ flex", "│ priority"))]
    assert [row[0] for row in rows] == ["flex", "priority"]
    page = (tmp_path / "plan.html").read_text()
    assert "6 agent tasks at 1 tasks/s" in page
    # The report carries the same table, cell for cell (the console may wrap the configuration).
    tiers = page[page.index("<table class=tiers>"):]
    tiers = tiers[:tiers.index("</table>")]
    html_rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(<td>.*?)</tr>", tiers)]
    assert [row[:4] for row in html_rows] == [row[:4] for row in rows]
    assert all(row[2] != "-" for row in html_rows)  # one worker at this light load holds both SLOs
    assert run_plan("--workload", "agentic", "--tiers", "gold", "--out", str(tmp_path)) == 2
    assert "--tiers: gold not among the tiers flex, default, priority" in capsys.readouterr().out
    assert run_plan("--workload", "agentic", "--prompt-scale", "2", "--out", str(tmp_path)) == 2
    assert "--prompt-scale applies to trace and poisson" in capsys.readouterr().out
