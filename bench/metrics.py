"""Summaries of a benchmark run, named as vLLM's ``bench serve`` names them (so result files compare directly)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.client import RequestResult

PERCENTILES = (50, 90, 99)
# metric -> (title in the printed report, what it is)
LATENCIES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


@dataclass(frozen=True)
class Goodput:
    """Service-level objectives in milliseconds (None: not constrained)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> Goodput:
        """From ``ttft:300 tpot:50`` (vLLM's --goodput syntax)."""
        values: dict[str, float] = {}
        for item in items:
            name, _, number = item.partition(":")
            if name not in ("ttft", "tpot", "e2el") or not number:
                raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, not {item!r}")
            try:
                values[f"{name}_ms"] = float(number)
            except ValueError:
                raise ValueError(f"--goodput {item!r}: {number!r} is not a number of milliseconds") from None
        return cls(**values)

    def met_by(self, result: RequestResult) -> bool:
        tpot = result.tpot or 0.0
        return (
            (self.ttft_ms is None or result.ttft * 1000 <= self.ttft_ms)
            and (self.tpot_ms is None or tpot * 1000 <= self.tpot_ms)
            and (self.e2el_ms is None or result.latency * 1000 <= self.e2el_ms)
        )


def _distribution(name: str, seconds: Sequence[float]) -> dict[str, float]:
    values = np.asarray(seconds, dtype=np.float64) * 1000 if len(seconds) else np.zeros(1)
    summary = {
        f"mean_{name}_ms": float(values.mean()),
        f"median_{name}_ms": float(np.median(values)),
        f"std_{name}_ms": float(values.std()),
    }
    for p in PERCENTILES:
        summary[f"p{p}_{name}_ms"] = float(np.percentile(values, p))
    return summary


def summarize(results: Sequence[RequestResult], duration: float, goodput: Goodput | None = None) -> dict[str, Any]:
    done = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    if goodput is not None:
        summary["request_goodput"] = sum(goodput.met_by(r) for r in done) / duration
    summary |= _distribution("ttft", [r.ttft for r in done])
    summary |= _distribution("tpot", [t for r in done if (t := r.tpot) is not None])
    summary |= _distribution("itl", [gap for r in done for gap in r.itl])
    summary |= _distribution("e2el", [r.latency for r in done])
    return summary


def format_report(summary: dict[str, Any]) -> str:
    """The report vLLM's ``bench serve`` prints, from a ``summarize`` result."""
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", summary["duration"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    if "request_goodput" in summary:
        row("Request goodput (req/s):", summary["request_goodput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total Token throughput (tok/s):", summary["total_token_throughput"])
    for name, (title, short) in LATENCIES.items():
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        row(f"Mean {short} (ms):", summary[f"mean_{name}_ms"])
        row(f"Median {short} (ms):", summary[f"median_{name}_ms"])
        for p in PERCENTILES[1:]:
            row(f"P{p} {short} (ms):", summary[f"p{p}_{name}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)
