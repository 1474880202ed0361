"""``spindle bench serve | offline | plot-sweep``: load tests over HTTP, in-process throughput, sweep charts."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.client import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, RequestResult
from bench.datasets import BenchRequest, file_dataset, prefix_dataset, random_dataset
from bench.metrics import Goodput, format_report, summarize
from engine.errors import SpindleError
from engine.tokenizer import Tokenizer


class BenchError(SpindleError):
    pass


def _add_dataset_arguments(parser: argparse.ArgumentParser, over_http: bool) -> None:
    """The workload options; in-process runs take --seed and the tokenizer from the engine's own options."""
    group = parser.add_argument_group("workload")
    group.add_argument("--dataset", choices=("random", "file", "prefix"), default="random")
    group.add_argument("--dataset-path", type=Path, help="JSON/JSONL prompts or ShareGPT conversations")
    group.add_argument("--num-prompts", type=int, default=100)
    group.add_argument("--random-input-len", type=int, default=256)
    group.add_argument("--random-output-len", type=int, default=128)
    group.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform within +-this fraction")
    group.add_argument("--output-len", type=int, default=None, help="output tokens per request (file, prefix)")
    group.add_argument("--prefix-groups", type=int, default=4, help="distinct shared system prompts (--dataset prefix)")
    group.add_argument("--prefix-len", type=int, default=512, help="tokens of each shared system prompt")
    group.add_argument("--suffix-len", type=int, default=32, help="tokens of each request's own question")
    group.add_argument("--ignore-eos", action="store_true", help="generate exactly the asked output lengths")
    if over_http:
        group.add_argument("--seed", type=int, default=0)
        group.add_argument(
            "--tokenizer", help="model file/dir whose tokenizer builds and counts prompts (default: embedded model)"
        )


def _load_tokenizer(path: str | None) -> Tokenizer:
    from engine.loader import open_model

    return open_model(path).tokenizer


def build_requests(args: argparse.Namespace, tokenizer: Tokenizer) -> list[BenchRequest]:
    if args.num_prompts < 1:
        raise BenchError("--num-prompts must be at least 1")
    try:
        if args.dataset == "random":
            return random_dataset(
                tokenizer,
                args.num_prompts,
                args.random_input_len,
                args.random_output_len,
                args.random_range_ratio,
                args.seed,
            )
        if args.dataset == "file":
            if args.dataset_path is None:
                raise BenchError("--dataset file needs --dataset-path")
            return file_dataset(args.dataset_path, tokenizer, args.num_prompts, args.output_len, args.seed or 0)
        return prefix_dataset(
            tokenizer,
            args.num_prompts,
            args.prefix_groups,
            args.prefix_len,
            args.suffix_len,
            args.output_len or args.random_output_len,
            args.seed or 0,
        )
    except ValueError as exc:
        raise BenchError(str(exc)) from exc


def result_record(
    args: argparse.Namespace, model: str, summary: dict[str, Any], results: list[RequestResult]
) -> dict[str, Any]:
    """What --save-result writes: the settings, vLLM-named summary, and per-request series for the plots."""
    run_start = min(r.start for r in results)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if args.endpoint == CHAT_ENDPOINT else "openai",
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model_id": model,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        **summary,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "tpots": [r.tpot for r in results],
        "itls": [r.itl for r in results],
        "e2els": [r.latency for r in results],
        "starts": [r.start - run_start for r in results],
        "token_times": [[t - run_start for t in r.token_times()] if r.success else [] for r in results],
        "errors": [r.error for r in results],
        "generated_texts": [r.generated_text for r in results],
    }


def _serve(args: argparse.Namespace) -> int:
    from bench.plots import plot_latencies, plot_timeline
    from bench.serve import LoadSettings, discover_model, run_load

    try:
        goodput = Goodput.parse(args.goodput) if args.goodput else None
    except ValueError as exc:
        raise BenchError(str(exc)) from exc
    requests = build_requests(args, _load_tokenizer(args.tokenizer))
    response_format = parse_response_format(args.response_format)
    api_key = args.api_key or os.environ.get("SPINDLE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    model = args.model or asyncio.run(discover_model(args.base_url, api_key))
    settings = LoadSettings(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=model,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        response_format=response_format,
        api_key=api_key,
        progress=not args.disable_tqdm,
    )
    try:
        results, duration = asyncio.run(run_load(requests, settings))
    except ValueError as exc:
        raise BenchError(str(exc)) from exc
    summary = summarize(results, duration, goodput)
    print(format_report(summary))
    errors = [r.error for r in results if not r.success]
    if errors:
        print(f"{len(errors)} failed; first error: {errors[0]}")
    record = result_record(args, model, summary, results)
    if args.save_result or args.result_file:
        path = Path(args.result_file or f"spindle-bench-{record['date']}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        print(f"result saved to {path}")
    if args.plot:
        args.plot.mkdir(parents=True, exist_ok=True)
        plot_latencies(record, args.plot / "latency.png")
        plot_timeline(record, args.plot / "throughput.png")
        print(f"charts written to {args.plot}/latency.png and throughput.png")
    return 0 if not errors else 1


def parse_response_format(value: str | None) -> dict[str, Any] | None:
    """--response-format: JSON text, or @PATH of a file holding it."""
    if value is None:
        return None
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        response_format = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"--response-format is neither JSON nor @FILE of JSON: {exc}") from exc
    if not isinstance(response_format, dict):
        raise BenchError("--response-format must be a JSON object")
    return response_format


def _offline(args: argparse.Namespace) -> int:
    from bench.offline import run_offline
    from engine.config import config_from_args
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(config_from_args(args))
    requests = build_requests(args, engine.tokenizer)
    prompts = [engine.tokenizer.encode(r.prompt) for r in requests]
    run = run_offline(engine, prompts, [r.output_len for r in requests], args.ignore_eos)
    print(run.report())
    return 0


def _plot_sweep(args: argparse.Namespace) -> int:
    from bench.plots import plot_sweep

    try:
        plot_sweep(args.results, args.output)
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot plot the sweep: {exc}") from exc
    print(f"sweep chart written to {args.output}")
    return 0


def add_bench_commands(commands: argparse._SubParsersAction) -> None:
    from engine.config import add_config_arguments

    bench = commands.add_parser("bench", help="benchmarks: serve (HTTP load test), offline, plot-sweep")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    serve = kinds.add_parser("serve", help="load-test an OpenAI-compatible server (Spindle or any other)")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000")
    serve.add_argument("--endpoint", choices=(COMPLETIONS_ENDPOINT, CHAT_ENDPOINT), default=COMPLETIONS_ENDPOINT)
    serve.add_argument("--model", default=None, help="model name to send (default: the first at /v1/models)")
    serve.add_argument("--api-key", default=None, help="default: $SPINDLE_API_KEY or $OPENAI_API_KEY")
    serve.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    serve.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1: Poisson)")
    serve.add_argument("--max-concurrency", type=int, default=None)
    serve.add_argument("--goodput", nargs="+", default=None, metavar="SLO", help="e.g. ttft:500 tpot:100 (ms)")
    serve.add_argument("--save-result", action="store_true", help="write the result JSON")
    serve.add_argument("--result-file", default=None, help="where to write the result JSON (implies --save-result)")
    serve.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write PNG charts into DIR")
    serve.add_argument("--disable-tqdm", action="store_true")
    serve.add_argument(
        "--response-format",
        default=None,
        metavar="JSON|@FILE",
        help='sent with every request, e.g. \'{"type": "json_object"}\' (structured output)',
    )
    _add_dataset_arguments(serve, over_http=True)
    serve.set_defaults(handler=_serve)

    offline = kinds.add_parser("offline", help="engine throughput in-process (no HTTP)")
    _add_dataset_arguments(offline, over_http=False)
    add_config_arguments(offline)
    offline.set_defaults(handler=_offline)

    sweep = kinds.add_parser("plot-sweep", help="chart throughput and latency across saved results")
    sweep.add_argument("results", nargs="+", type=Path)
    sweep.add_argument("--output", type=Path, default=Path("sweep.png"))
    sweep.set_defaults(handler=_plot_sweep)
