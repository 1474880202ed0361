"""Several servers under one load, side by side: what each run gave and the Markdown table of it.

The columns follow the usual way of comparing servers on one machine: output throughput at every concurrency, the
per-token latency of a lone stream (TPOT p50 at the lowest concurrency), the queueing under the heaviest load (TTFT
p99 at the highest), and the server's peak resident memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 2**20
MISSING = "–"


@dataclass
class ServerRun:
    """One server's results: ``summaries`` maps a concurrency to ``bench.metrics.summarize`` of the run at it."""

    name: str
    settings: str  # weights, dtype and the flags that matter, in a few words
    command: str  # how it was started
    summaries: dict[int, dict[str, Any]] = field(default_factory=dict)
    peak_rss_bytes: int | None = None
    notes: list[str] = field(default_factory=list)  # why it was skipped or failed, requests that fell short


def _milliseconds(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _columns(concurrencies: Sequence[int]) -> list[tuple[str, int, str]]:
    """(header, concurrency, summary key) for every column after the server's name."""
    levels = sorted(set(concurrencies))
    columns = []
    for level in levels:
        columns.append((f"c={level}: out tok/s", level, "output_throughput"))
        if level == levels[0]:
            columns.append((f"c={level}: TPOT p50 (ms)", level, "median_tpot_ms"))
        if level == levels[-1]:
            columns.append((f"c={level}: TTFT p99 (ms)", level, "p99_ttft_ms"))
    return columns


def _cell(run: ServerRun, level: int, key: str) -> str:
    summary = run.summaries.get(level)
    if summary is None or not summary.get("completed"):
        return MISSING
    value = summary[key]
    return f"{value:.1f}" if key == "output_throughput" else _milliseconds(value)


def peer_table(runs: Sequence[ServerRun], concurrencies: Sequence[int]) -> str:
    """A Markdown table with a row per server that ran, then one line per note (skipped servers, failures)."""
    columns = _columns(concurrencies)
    header = ["server", "settings", *(title for title, _, _ in columns), "peak RSS (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for run in runs:
        if not run.summaries:
            continue
        rss = MISSING if run.peak_rss_bytes is None else f"{run.peak_rss_bytes / MIB:.0f}"
        cells = [run.name, run.settings, *(_cell(run, level, key) for _, level, key in columns), rss]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {run.name}: {note}" for run in runs for note in run.notes]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"
