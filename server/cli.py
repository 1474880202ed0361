"""The ``spindle`` command: ``serve`` (the OpenAI-compatible server), ``router`` (one endpoint in front of several
servers), ``generate`` (offline, one prompt), ``export-hf`` (the model as a Hugging Face directory), ``env`` (the CPU
profile and kernels in use) and ``bench`` (load tests and throughput benchmarks)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bench.cli import add_bench_commands
from engine.capabilities import capability_report
from engine.config import EngineConfig, add_config_arguments, config_from_args
from engine.errors import SpindleError
from kernels.cpu_profile import CpuProfileError, cpu_profile

logger = logging.getLogger("spindle.server")


def _torchrun_worker(config: EngineConfig) -> int | None:
    """Under torchrun, a rank other than 0 runs the tensor-parallel worker loop (its exit code); rank 0 serves."""
    from engine.parallel.launch import torchrun_rank

    rank = torchrun_rank()
    if not rank:
        return None
    from engine.worker_rank import run_worker

    return run_worker(config, rank, int(os.environ["WORLD_SIZE"]), "env://")


def _generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    config = config_from_args(args)
    worker_exit = _torchrun_worker(config)
    if worker_exit is not None:
        return worker_exit
    llm = LLM(config=config)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
    )
    if args.chat:
        result = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        result = llm.generate(args.prompt, params)[0]
    print(result.outputs[0].text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from server.app import run_server

    config = config_from_args(args)
    for what, chosen in capability_report():
        logger.info("%s: %s", what, chosen)
    worker_exit = _torchrun_worker(config)
    if worker_exit is not None:
        return worker_exit
    run_server(config)
    return 0


def _router(args: argparse.Namespace) -> int:
    from server.router.app import run_router

    run_router(config_from_args(args))
    return 0


# Of the server's settings, those the router applies to itself.
ROUTER_SERVER_FIELDS = (
    "host",
    "port",
    "log_level",
    "max_request_body_bytes",
    "shutdown_timeout",
    "header_read_timeout",
    "body_read_timeout",
    "keep_alive_timeout",
    "max_connections",
)


def _export_hf(args: argparse.Namespace) -> int:
    import torch

    from engine.loader import open_model
    from engine.loader.hf_export import export_hf_directory

    export_hf_directory(open_model(args.model), args.output, getattr(torch, args.dtype))
    print(f"{args.output}: Hugging Face model directory written")
    return 0


def _env(args: argparse.Namespace) -> int:
    report = capability_report()
    width = max(len(what) for what, _ in report)
    for what, chosen in report:
        print(f"{what:<{width}}  {chosen}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle", description="Spindle LLM serving engine")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_config_arguments(serve)
    serve.set_defaults(handler=_serve)
    router = commands.add_parser("router", help="spread requests over several Spindle servers (replicas)")
    add_config_arguments(router, sections=("router",), also=ROUTER_SERVER_FIELDS)
    router.set_defaults(handler=_router)
    generate = commands.add_parser("generate", help="generate a completion offline")
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampler for this prompt")
    add_config_arguments(generate)
    generate.set_defaults(handler=_generate)
    export = commands.add_parser(
        "export-hf", help="write the model (default: the embedded one) as a Hugging Face directory"
    )
    export.add_argument("output", type=Path, help="directory to write (created if missing)")
    export.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: embedded model)")
    export.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    export.set_defaults(handler=_export_hf)
    env = commands.add_parser("env", help="show the CPU profile and the kernels Spindle runs here (no model needed)")
    env.set_defaults(handler=_env)
    add_bench_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown `spindle bench`'s report
    args = build_parser().parse_args(argv)
    try:
        cpu_profile()  # a profile name that does not exist is a configuration error, before anything is built
        return args.handler(args)
    except (SpindleError, CpuProfileError) as exc:
        print(f"spindle: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C, re-raised by uvicorn after its graceful shutdown
        return 130


if __name__ == "__main__":
    sys.exit(main())
