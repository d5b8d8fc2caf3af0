"""PNG plots of a twin run: latency CDFs and the fleet's power over time (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from tokenfactory.twin.simulator import SimulationResult


def pyplot():
    """matplotlib's pyplot on the Agg backend (PNG files only)."""
    import matplotlib  # loaded only when plots are asked for: it takes a while to import

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def log_axes(ax, which: str) -> None:
    """Log scale on the axes named in `which` ("x", "y" or both), ticks as plain numbers."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    # Minor ticks labelled at 2, 3 and 5 times a power of ten only, so labels never crowd.
    sparse = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "235" else "")
    for name in which:
        axis = ax.xaxis if name == "x" else ax.yaxis
        (ax.set_xscale if name == "x" else ax.set_yscale)("log")
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(sparse)


def cdf(ax, values: list[float], color: str, label: str | None = None) -> None:
    """The empirical CDF of `values` on `ax` (a step per value), on a fraction-of-requests axis."""
    values = sorted(values)
    if values:
        ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", color=color,
                label=label)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(True, alpha=0.3)


def write_replay_plots(result: SimulationResult, directory: Path, title: str) -> list[Path]:
    """latency_cdf.png (TTFT, inter-token and end-to-end latency) and power.png (fleet watts
    per interval, idle GPUs included) in `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    finished = [r for r in result.records if r.finish >= 0]
    series = [
        ("time to first token (s)", [r.ttft for r in finished]),
        ("inter-token latency (ms)", [1000 * r.itl for r in finished if r.num_output_tokens > 1]),
        ("end-to-end latency (s)", [r.e2e for r in finished]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=110)
    for ax, (label, values) in zip(axes, series):
        values = sorted(values)
        cdf(ax, values, "tab:blue")
        if values:
            for q, style in ((0.5, ":"), (0.9, "--"), (0.99, "-.")):
                ax.axvline(values[min(len(values) - 1, int(q * len(values)))], color="0.5", linestyle=style,
                           linewidth=1, label=f"p{round(q * 100)}")
            if values[0] > 0 and values[-1] / values[0] > 100:
                ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    latency = directory / "latency_cdf.png"
    figure.savefig(latency)
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(10, 4), dpi=110)
    interval = result.power_interval_s
    start = min((r.arrival for r in result.records), default=0.0)
    first = int(start // interval)
    minutes = [(first + i + 0.5) * interval / 60 for i in range(len(result.power_w))]
    ax.plot(minutes, [w / 1e3 for w in result.power_w], color="tab:red", linewidth=1.2, drawstyle="steps-mid",
            label="fleet power")
    ax.set_xlabel("simulated time (min)")
    ax.set_ylabel(f"kW (mean per {interval:g} s, modeled)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    power = directory / "power.png"
    figure.savefig(power)
    plt.close(figure)
    return [latency, power]
