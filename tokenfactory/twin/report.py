"""The planner's outputs: the Pareto frontier as a PNG and a self-contained HTML report.

The PNG plots every (configuration, load) point: tokens/s per user across, tokens/s per GPU (or
per MW) up; points meeting the SLO target in colour by layout, the others hollow and grey, the
frontier as a line; with tiers, each tier's cheapest point where its SLO holds is marked and
labelled with its $ per million tokens. The HTML page embeds that PNG as base64 and holds the
tables (the cost per tier with the same figures as the console's), so it can be mailed or
archived as one file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from tokenfactory.twin.plots import pyplot

if TYPE_CHECKING:  # plan.py imports this module
    from tokenfactory.twin.plan import Point, TierCost

POINT_COLUMNS: list[tuple[str, Callable[[Point], str]]] = [
    ("configuration", lambda p: p.candidate.label),
    ("load", lambda p: f"x{p.speedup:g} ({p.offered_rps:.1f} req/s)"),
    ("tok/s/GPU", lambda p: f"{p.tokens_per_s_per_gpu:.0f}"),
    ("tok/s/MW", lambda p: f"{p.tokens_per_s_per_mw / 1e6:.2f}M"),
    ("tok/s/user", lambda p: f"{p.tokens_per_s_per_user:.0f}"),
    ("goodput req/s", lambda p: f"{p.goodput_rps:.2f}"),
    ("SLO met", lambda p: f"{p.slo_attainment:.0%}"),
    ("TTFT p90 s", lambda p: f"{p.summary.ttft.p90:.2f}"),
    ("ITL p90 ms", lambda p: f"{1e3 * p.summary.itl.p90:.1f}"),
    ("$/Mtok", lambda p: f"{p.usd_per_million_tokens:.3f}"),
    ("J/token", lambda p: f"{p.joules_per_token:.2f}"),
]


TIER_COLUMNS = ("tier", "SLO TTFT / ITL", "$/Mtok", "price $/Mtok", "configuration", "load", "SLO met")


def tier_rows(costs: list[TierCost]) -> list[tuple[str, ...]]:
    """One row per tier under `TIER_COLUMNS`: the console and the HTML page print these same cells."""
    rows = []
    for c in costs:
        slo = f"{c.slo.ttft_s:g} s / {1e3 * c.slo.itl_s:g} ms"
        if c.point is None:
            rows.append((c.tier, slo, "-", "-", "the SLO holds at no point searched", "-", "-"))
            continue
        p = c.point
        rows.append((c.tier, slo, f"{c.usd_per_million_tokens:.3f}", f"{c.price_usd_per_million:.3f}",
                     p.candidate.label, f"x{p.speedup:g} ({p.offered_rps:.1f} req/s)",
                     f"{p.tier_attainment[c.tier]:.0%}"))
    return rows


def tier_title(min_attainment: float) -> str:
    return f"cost per tier: the cheapest point where the tier's SLO holds for {min_attainment:.0%} of requests"


def tier_table(costs: list[TierCost], min_attainment: float) -> Table:
    table = Table(title=tier_title(min_attainment))
    for name in TIER_COLUMNS:
        table.add_column(name, justify="left" if name in ("tier", "configuration") else "right")
    for row in tier_rows(costs):
        table.add_row(*row)
    return table


def points_table(points: list[Point], title: str) -> Table:
    table = Table(title=title)
    for name, _ in POINT_COLUMNS:
        table.add_column(name, justify="left" if name == "configuration" else "right",
                         no_wrap=name == "configuration")
    for point in points:
        table.add_row(*(cell(point) for _, cell in POINT_COLUMNS))
    return table


def draw_frontier(
    points: list[Point],
    frontier: list[Point],
    min_attainment: float,
    y: Callable[[Point], float],
    y_label: str,
    path: Path,
    title: str,
    tier_costs: list[TierCost] = (),
) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(9, 6), dpi=110)
    layouts = sorted({_family(p) for p in points})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(layouts)}
    for name in layouts:
        meeting = [p for p in points if _family(p) == name and p.slo_attainment >= min_attainment]
        missing = [p for p in points if _family(p) == name and p.slo_attainment < min_attainment]
        if meeting:
            axes.scatter([p.tokens_per_s_per_user for p in meeting], [y(p) for p in meeting],
                         color=colours[name], label=name, s=36, zorder=3)
        if missing:
            axes.scatter([p.tokens_per_s_per_user for p in missing], [y(p) for p in missing],
                         facecolors="none", edgecolors="0.6", s=36, zorder=2)
    if frontier:
        axes.plot([p.tokens_per_s_per_user for p in frontier], [y(p) for p in frontier],
                  color="black", linewidth=1.5, zorder=4, label="Pareto frontier")
    axes.scatter([], [], facecolors="none", edgecolors="0.6", label=f"SLO met by < {min_attainment:.0%}")
    marked: dict[int, list[TierCost]] = {}  # tiers sharing a point share its star and label
    for c in tier_costs:
        if c.point is not None:
            marked.setdefault(id(c.point), []).append(c)
    for i, same in enumerate(marked.values()):
        p = same[0].point
        axes.scatter([p.tokens_per_s_per_user], [y(p)], marker="*", s=220, facecolors="gold", edgecolors="black",
                     zorder=5, label="each tier's cheapest point" if i == 0 else None)
        axes.annotate(f"{', '.join(c.tier for c in same)}: ${p.usd_per_million_tokens:.3f}/Mtok",
                      (p.tokens_per_s_per_user, y(p)), textcoords="offset points", xytext=(9, 6), fontsize=8,
                      zorder=6)
    axes.set_xlabel("output tokens/s per user (1 / median inter-token latency)")
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _family(point: Point) -> str:
    """The legend entry: layout and tensor parallelism."""
    return f"{point.candidate.layout} TP{point.candidate.tp}"


def html_report(
    title: str,
    inputs: list[tuple[str, str]],
    points: list[Point],
    top: list[Point],
    frontier: list[Point],
    min_attainment: float,
    png: Path,
    tier_costs: list[TierCost] = (),
) -> str:
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    everything = sorted(points, key=lambda p: (p.candidate.label, p.speedup))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0 2em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
table.tiers td:nth-child(5), table.tiers th:nth-child(5), table.inputs td {{ text-align: left; }}
tr.miss td {{ color: #999; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{_pairs(inputs)}
<h2>Pareto frontier</h2>
<img alt="Pareto frontier" src="data:image/png;base64,{image}">
{_table(frontier, min_attainment)}
{_tier_section(tier_costs, min_attainment)}
<h2>Best configurations (by goodput per GPU, SLO met by at least {min_attainment:.0%})</h2>
{_table(top, min_attainment) if top else "<p>No configuration meets the SLO at any load.</p>"}
<h2>Every simulation</h2>
{_table(everything, min_attainment)}
<p>All figures come from the digital twin (real scheduler, KV cache and router; roofline cost model);
energy and power are modeled.</p>
</body></html>
"""


def _tier_section(costs: list[TierCost], min_attainment: float) -> str:
    if not costs:
        return ""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in TIER_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in tier_rows(costs))
    return (f"<h2>{html.escape(tier_title(min_attainment)[0].upper() + tier_title(min_attainment)[1:])}</h2>\n"
            "<p>$/Mtok: what the point's GPUs (and power, when priced) cost per million output tokens; "
            "price $/Mtok: what the tier's prices charge for the same tokens.</p>\n"
            f"<table class=tiers><tr>{head}</tr>{body}</table>")


def _pairs(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class=inputs>{body}</table>"


def _table(points: list[Point], min_attainment: float) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in POINT_COLUMNS)
    rows = "".join(
        f"<tr{'' if p.slo_attainment >= min_attainment else ' class=miss'}>"
        + "".join(f"<td>{html.escape(cell(p))}</td>" for _, cell in POINT_COLUMNS)
        + "</tr>"
        for p in points
    )
    return f"<table><tr>{head}</tr>{rows}</table>"
