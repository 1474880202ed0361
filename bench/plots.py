"""PNG charts of benchmark results: latency distributions, throughput over time, a concurrency sweep, and several
servers side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np

from bench.peers import ServerRun

matplotlib.use("Agg")  # files only, no display; before pyplot is first imported
import matplotlib.pyplot as plt


def plot_latencies(result: dict[str, Any], path: Path) -> None:
    """Histograms of TTFT, TPOT, ITL and end-to-end latency (ms) from a saved result."""
    series = {
        "TTFT (ms)": result["ttfts"],
        "TPOT (ms)": [t for t in result["tpots"] if t is not None],
        "ITL (ms)": [gap for gaps in result["itls"] for gap in gaps],
        "E2E latency (ms)": result["e2els"],
    }
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for axis, (label, seconds) in zip(axes.flat, series.items()):
        values = np.asarray(seconds) * 1000
        if len(values):
            axis.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
            for p, style in ((50, "-"), (99, "--")):
                axis.axvline(np.percentile(values, p), color="tab:red", linestyle=style, label=f"p{p}")
            axis.legend()
        axis.set_xlabel(label)
        axis.set_ylabel("count")
    figure.suptitle(_title(result))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_timeline(result: dict[str, Any], path: Path, bin_seconds: float = 1.0) -> None:
    """Output tokens per second and requests in flight over the run."""
    token_times = [t for times in result["token_times"] for t in times]
    duration = max(result["duration"], bin_seconds)
    edges = np.arange(0.0, duration + bin_seconds, bin_seconds)
    tokens, _ = np.histogram(token_times, bins=edges)
    starts, ends = np.asarray(result["starts"]), np.asarray(result["starts"]) + np.asarray(result["e2els"])
    middles = edges[:-1] + bin_seconds / 2
    in_flight = [int(np.sum((starts <= t) & (ends > t))) for t in middles]
    figure, throughput_axis = plt.subplots(figsize=(10, 4))
    throughput_axis.plot(middles, tokens / bin_seconds, color="tab:blue", label="output tokens/s")
    throughput_axis.set_xlabel("time since start (s)")
    throughput_axis.set_ylabel("output tokens/s", color="tab:blue")
    concurrency_axis = throughput_axis.twinx()
    concurrency_axis.plot(middles, in_flight, color="tab:orange", label="requests in flight")
    concurrency_axis.set_ylabel("requests in flight", color="tab:orange")
    figure.suptitle(_title(result))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_sweep(result_files: Sequence[Path], path: Path) -> None:
    """Throughput and latency against max concurrency (or request rate) from several saved results."""
    results = [json.loads(Path(file).read_text()) for file in result_files]
    by_concurrency = all(r.get("max_concurrency") for r in results)
    key = "max_concurrency" if by_concurrency else "request_rate"
    results.sort(key=lambda r: float(r[key]))
    x = [float(r[key]) for r in results]
    figure, (throughput_axis, latency_axis) = plt.subplots(1, 2, figsize=(11, 4))
    throughput_axis.plot(x, [r["output_throughput"] for r in results], "o-", label="output tok/s")
    throughput_axis.plot(x, [r["request_throughput"] * 60 for r in results], "s--", label="requests/min")
    throughput_axis.set_xlabel(key.replace("_", " "))
    throughput_axis.set_ylabel("throughput")
    throughput_axis.legend()
    styles = {"median_ttft_ms": "o-", "p99_ttft_ms": "o--", "median_tpot_ms": "s-", "p99_tpot_ms": "s--"}
    for name, style in styles.items():
        latency_axis.plot(x, [r[name] for r in results], style, label=name.replace("_ms", " (ms)"))
    latency_axis.set_xlabel(key.replace("_", " "))
    latency_axis.set_ylabel("ms")
    latency_axis.set_yscale("log")
    latency_axis.legend()
    if by_concurrency:
        for axis in (throughput_axis, latency_axis):
            axis.set_xscale("log", base=2)
    figure.suptitle(f"{results[0].get('model_id', '')} at {results[0].get('base_url', '')}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_peers(runs: Sequence[ServerRun], path: Path, title: str) -> None:
    """Output throughput, TPOT p50 and TTFT p99 against concurrency, one line per server."""
    panels = (
        ("output_throughput", "output tokens/s", "linear"),
        ("median_tpot_ms", "TPOT p50 (ms)", "linear"),
        ("p99_ttft_ms", "TTFT p99 (ms)", "log"),  # from a lone request to a long queue: orders of magnitude
    )
    levels = sorted({level for run in runs for level in run.summaries})
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    figure, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for axis, (key, label, scale) in zip(axes, panels):
        values = []
        for run in runs:
            done = [level for level in levels if run.summaries.get(level, {}).get("completed")]
            if done:
                values += [run.summaries[level][key] for level in done]
                axis.plot(done, values[-len(done) :], "o-", label=run.name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_yscale(scale)
        axis.yaxis.set_major_formatter(plain)
        # Within one decade a log axis has no major tick to label: label its minor ones then.
        narrow = scale == "log" and values and max(values) < 10 * min(values)
        axis.yaxis.set_minor_formatter(plain if narrow else matplotlib.ticker.NullFormatter())
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    if values:
        axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _title(result: dict[str, Any]) -> str:
    concurrency = result.get("max_concurrency") or "unbounded"
    return f"{result.get('model_id', '')}: {result['completed']} requests, max concurrency {concurrency}"
