"""PNG plots of a twin run: latency CDFs and the fleet's power over time (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from tokenfactory.twin.simulator import SimulationResult


def _pyplot():
    import matplotlib  # loaded only when plots are asked for: it takes a while to import

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def write_replay_plots(result: SimulationResult, directory: Path, title: str) -> list[Path]:
    """latency_cdf.png (TTFT, inter-token and end-to-end latency) and power.png (fleet watts
    per interval, idle GPUs included) in `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    finished = [r for r in result.records if r.finish >= 0]
    series = [
        ("time to first token (s)", [r.ttft for r in finished]),
        ("inter-token latency (ms)", [1000 * r.itl for r in finished if r.num_output_tokens > 1]),
        ("end-to-end latency (s)", [r.e2e for r in finished]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=110)
    for ax, (label, values) in zip(axes, series):
        values = sorted(values)
        if values:
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", color="tab:blue")
            for q, style in ((0.5, ":"), (0.9, "--"), (0.99, "-.")):
                ax.axvline(values[min(len(values) - 1, int(q * len(values)))], color="0.5", linestyle=style,
                           linewidth=1, label=f"p{round(q * 100)}")
            if values[0] > 0 and values[-1] / values[0] > 100:
                ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.01)
        ax.grid(True, alpha=0.3)
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
