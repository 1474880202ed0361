"""``spindle bench``: statistics on known data, workloads, and the load client against the real server."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from bench.cli import BenchError, parse_response_format
from bench.client import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, RequestResult
from bench.datasets import BenchRequest, DatasetError, file_dataset, prefix_dataset, random_dataset
from bench.metrics import Goodput, format_report, summarize
from bench.offline import run_offline
from bench.serve import LoadSettings, run_load
from engine.llm import LLM

if TYPE_CHECKING:
    from tests.server_fixtures import ServerProcess

pytest_plugins = ["tests.server_fixtures"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


# --- statistics ------------------------------------------------------------------------------------------------------


def known_results() -> list[RequestResult]:
    """Ten requests with TTFT 0.1 .. 1.0 s, 11 output tokens each arriving 0.05 s apart, and one failure."""
    results = []
    for i in range(1, 11):
        ttft = i / 10
        results.append(
            RequestResult(
                prompt_len=100, success=True, ttft=ttft, latency=ttft + 0.5, itl=[0.05] * 10, output_tokens=11
            )
        )
    results.append(RequestResult(prompt_len=100, error="HTTP 400: bad"))
    return results


def test_summary_on_known_data() -> None:
    summary = summarize(known_results(), duration=10.0, goodput=Goodput(ttft_ms=500))
    assert summary["completed"] == 10 and summary["failed"] == 1
    assert summary["total_input_tokens"] == 1000 and summary["total_output_tokens"] == 110
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["output_throughput"] == pytest.approx(11.0)
    assert summary["total_token_throughput"] == pytest.approx(111.0)
    assert summary["request_goodput"] == pytest.approx(0.5)  # TTFT <= 500 ms: the first five
    # Linear interpolation between order statistics: p90 of 100..1000 ms sits at rank 8.1 -> 910 ms.
    assert summary["mean_ttft_ms"] == pytest.approx(550.0)
    assert summary["median_ttft_ms"] == pytest.approx(550.0)
    assert summary["p90_ttft_ms"] == pytest.approx(910.0)
    assert summary["p99_ttft_ms"] == pytest.approx(991.0)
    assert summary["mean_tpot_ms"] == pytest.approx(50.0)  # (latency - ttft) / 10 tokens after the first
    assert summary["p99_itl_ms"] == pytest.approx(50.0)
    assert summary["mean_e2el_ms"] == pytest.approx(1050.0)
    report = format_report(summary)
    assert re.search(r"Successful requests:\s+10\b", report) and re.search(r"P90 TTFT \(ms\):\s+910\.00", report)


def test_goodput_syntax() -> None:
    assert Goodput.parse(["ttft:300", "tpot:50.5"]) == Goodput(ttft_ms=300, tpot_ms=50.5)
    for bad in (["ttft"], ["latency:3"], ["tpot:fast"]):
        with pytest.raises(ValueError, match="goodput"):
            Goodput.parse(bad)


# --- workloads -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(offline_llm: LLM):
    return offline_llm.tokenizer


def test_random_dataset_lengths(tokenizer) -> None:
    requests = random_dataset(tokenizer, 20, input_len=100, output_len=40, range_ratio=0.5, seed=1)
    assert len(requests) == 20
    assert all(20 <= r.output_len <= 60 for r in requests)
    assert len({r.output_len for r in requests}) > 1
    assert all(len(tokenizer.encode(r.prompt)) == r.prompt_len for r in requests)
    assert min(r.prompt_len for r in requests) >= 40 and max(r.prompt_len for r in requests) <= 180
    assert requests == random_dataset(tokenizer, 20, input_len=100, output_len=40, range_ratio=0.5, seed=1)
    with pytest.raises(DatasetError, match="range-ratio"):
        random_dataset(tokenizer, 1, 10, 10, 1.5, 0)


def test_random_dataset_prompts_have_exactly_the_asked_length(tokenizer) -> None:
    requests = random_dataset(tokenizer, 32, input_len=128, output_len=16, range_ratio=0.0, seed=3)
    assert [len(tokenizer.encode(r.prompt)) for r in requests] == [128] * 32
    assert len({r.prompt for r in requests}) == 32


def test_file_dataset_reads_sharegpt_and_jsonl(tokenizer, tmp_path: Path) -> None:
    sharegpt = [
        {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue is one."}]},
        {"conversations": [{"from": "gpt", "value": "no question here"}]},  # unusable: skipped
    ]
    (tmp_path / "chats.json").write_text(json.dumps(sharegpt))
    requests = file_dataset(tmp_path / "chats.json", tokenizer, 10, None, seed=0)
    assert [r.messages for r in requests] == [[{"role": "user", "content": "Name a colour."}]]
    assert requests[0].output_len == len(tokenizer.encode("Blue is one."))

    lines = [{"prompt": "Hello there", "output_len": 7}, {"messages": [{"role": "user", "content": "Hi"}]}]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    requests = file_dataset(tmp_path / "prompts.jsonl", tokenizer, 10, None, seed=0)
    assert sorted(r.prompt for r in requests) == ["Hello there", "Hi"]
    assert {r.prompt: r.output_len for r in requests}["Hello there"] == 7

    (tmp_path / "broken.jsonl").write_text("{not json")
    with pytest.raises(DatasetError, match="neither a JSON array nor JSON lines"):
        file_dataset(tmp_path / "broken.jsonl", tokenizer, 10, None, seed=0)


def test_prefix_dataset_shares_system_prompts(tokenizer) -> None:
    requests = prefix_dataset(tokenizer, 9, groups=3, prefix_len=64, suffix_len=8, output_len=5, seed=0)
    systems = [r.messages[0]["content"] for r in requests]
    assert len(set(systems)) == 3 and systems[0] == systems[3] == systems[6]
    assert len({r.messages[1]["content"] for r in requests}) == 9


# --- against the real server -----------------------------------------------------------------------------------------


def generation_tokens(server: ServerProcess) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(r"^spindle:generation_tokens_total\{[^}]*\} (\S+)$", metrics, re.M))


@pytest.mark.parametrize("endpoint", [COMPLETIONS_ENDPOINT, CHAT_ENDPOINT])
def test_load_client_counts_add_up(server: ServerProcess, model: str, endpoint: str) -> None:
    requests = [
        BenchRequest([{"role": "user", "content": f"Count to {i}."}], prompt_len=5, output_len=4 + i) for i in range(6)
    ]
    before = generation_tokens(server)
    settings = LoadSettings(server.url, endpoint, model, max_concurrency=2, ignore_eos=True, progress=False)
    results, duration = asyncio.run(run_load(requests, settings))
    assert [r.success for r in results] == [True] * 6, [r.error for r in results]
    assert [r.output_tokens for r in results] == [r.output_len for r in requests]
    assert generation_tokens(server) - before == sum(r.output_len for r in requests)
    for result in results:
        assert 0 < result.ttft <= result.latency <= duration
        assert len(result.itl) <= result.output_tokens - 1 and result.generated_text
    summary = summarize(results, duration)
    assert summary["completed"] == 6 and summary["total_output_tokens"] == sum(r.output_len for r in requests)


def test_failed_requests_are_counted_with_their_error(server: ServerProcess) -> None:
    request = BenchRequest([{"role": "user", "content": "hi"}], prompt_len=1, output_len=4)
    settings = LoadSettings(server.url, COMPLETIONS_ENDPOINT, "no-such-model", progress=False)
    results, duration = asyncio.run(run_load([request, request], settings))
    assert [r.success for r in results] == [False, False]
    assert results[0].error.startswith("HTTP 404")
    assert summarize(results, duration)["failed"] == 2


def test_bench_serve_command_writes_result_and_charts(server: ServerProcess, tmp_path: Path) -> None:
    result_files = []
    for concurrency in (1, 3):
        result_file = tmp_path / f"c{concurrency}.json"
        command = [
            *(sys.executable, "-m", "server.cli", "bench", "serve", "--base-url", server.url),
            *("--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "3", "--ignore-eos"),
            *("--max-concurrency", str(concurrency), "--result-file", str(result_file), "--disable-tqdm"),
            *("--goodput", "ttft:60000", "--plot", str(tmp_path / f"plots{concurrency}")),
        ]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Serving Benchmark Result" in done.stdout
        record = json.loads(result_file.read_text())
        assert record["completed"] == 4 and record["total_output_tokens"] == 12
        assert record["request_goodput"] > 0 and record["max_concurrency"] == concurrency
        for chart in ("latency.png", "throughput.png"):
            assert (tmp_path / f"plots{concurrency}" / chart).read_bytes().startswith(PNG_MAGIC)
        result_files.append(str(result_file))
    sweep = tmp_path / "sweep.png"
    command = [sys.executable, "-m", "server.cli", "bench", "plot-sweep", *result_files, "--output", str(sweep)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sweep.read_bytes().startswith(PNG_MAGIC)


def test_bench_serve_reports_bad_options(server: ServerProcess) -> None:
    command = [sys.executable, "-m", "server.cli", "bench", "serve", "--base-url", server.url, "--goodput", "x:1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 2 and "spindle: error: --goodput" in done.stderr


def test_offline_run_counts_tokens(offline_llm: LLM) -> None:
    engine = offline_llm.engine
    prompts = [engine.tokenizer.encode("Once upon a time"), engine.tokenizer.encode("The sky is")]
    run = run_offline(engine, prompts, [3, 5])
    assert run.num_requests == 2 and run.output_tokens == 8
    assert run.prompt_tokens == sum(len(p) for p in prompts) and run.duration > 0
    assert "output tokens/s" in run.report()


def test_load_client_sends_response_format(server: ServerProcess, model: str, tmp_path: Path) -> None:
    answer = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": ["yes", "no"]}}}
    (tmp_path / "format.json").write_text(json.dumps(answer))
    assert parse_response_format(f"@{tmp_path / 'format.json'}") == parse_response_format(json.dumps(answer)) == answer
    for bad in ("{not json", "[1]", "@/no/such/file"):
        with pytest.raises(BenchError):
            parse_response_format(bad)
    requests = [BenchRequest([{"role": "user", "content": "Is it raining?"}], prompt_len=5, output_len=8)] * 2
    settings = LoadSettings(server.url, CHAT_ENDPOINT, model, response_format=answer, progress=False)
    results, _ = asyncio.run(run_load(requests, settings))
    assert all(r.success and r.generated_text in ('"yes"', '"no"') for r in results), results
