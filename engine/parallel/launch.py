"""Start or join the tensor-parallel process group, and watch and stop the worker processes.

``tensor_parallel_size`` N > 1 in a plain process: this process is rank 0 (the engine) and it starts ranks 1..N-1
as worker processes (``python -m engine.parallel.worker``, their arguments pickled on stdin, so the caller's main
module is never re-imported; among them the worker's main, which the caller passes in) that meet it on a loopback
port. Under ``torchrun`` (RANK and WORLD_SIZE set) every process joins the group torchrun describes; rank 0 serves
and the others run the worker loop, so a multi-node run needs nothing more than torchrun's own flags.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.errors import ConfigError, WorkerGroupError
from engine.model_spec import ModelSpec
from engine.parallel.group import TensorParallelGroup
from engine.parallel.shard import TensorShard

logger = logging.getLogger("spindle.parallel")

# A worker rank's life: (config, rank, world size, init method, the model's spec) -> the process's exit code.
WorkerMain = Callable[[EngineConfig, int, int, str, ModelSpec | None], int]

WORKER_EXIT_SECONDS = 10.0  # how long a stopping engine waits for its workers to leave on their own
STARTUP_TIMEOUT = timedelta(minutes=10)  # for every rank to meet (a started worker that dies is noticed at once)


def torchrun_rank() -> int | None:
    """This process's rank when torchrun (or any launcher setting RANK and WORLD_SIZE) started it, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"])
    return None


@dataclass(frozen=True)
class WorkerArgs:
    """What a started worker needs to join rank 0 (pickled to its stdin)."""

    rank: int
    world_size: int
    init_method: str
    config: EngineConfig
    spec: ModelSpec
    main: WorkerMain  # a module-level function: pickled by name, so unpickling imports what it needs


@dataclass
class LocalRank:
    """This process's place in the tensor-parallel group; on a rank 0 that started its workers, their processes."""

    tp: TensorParallelGroup
    device: torch.device
    num_threads: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _closed: bool = False

    def check(self, wait: float = 0.0) -> None:
        """Raise WorkerGroupError if a started worker has exited (a dead worker would otherwise be noticed only at
        the next step); ``wait`` seconds for one to exit first, e.g. after a collective failed."""
        deadline = time.monotonic() + wait
        while True:
            for rank, process in enumerate(self.processes, start=1):
                if process.poll() is not None:
                    raise WorkerGroupError(
                        f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {process.returncode}"
                    )
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def close(self) -> None:
        """Rank 0: end the workers' loop, wait for them briefly, then kill any that remain; leave the group.

        Telling a hung worker to stop would block (a send waits for its receiver), so it is bounded and skipped
        once a step has failed; the group is only torn down when every worker left cleanly."""
        if self._closed or self.tp.world_size == 1:
            return
        self._closed = True
        told = not self.tp.failed and _within(WORKER_EXIT_SECONDS, lambda: self.tp.send_plan(None))
        left_cleanly = told
        for process in self.processes:
            try:
                process.wait(WORKER_EXIT_SECONDS if told else 0)
            except subprocess.TimeoutExpired:
                logger.warning("killing tensor-parallel worker pid %d", process.pid)
                process.kill()
                process.wait()
                left_cleanly = False
        if left_cleanly and dist.is_initialized():
            dist.destroy_process_group()


def _within(seconds: float, action: Callable[[], None]) -> bool:
    """Run ``action`` in a daemon thread; whether it finished without raising within ``seconds``."""
    done = threading.Event()

    def run() -> None:
        try:
            action()
            done.set()
        except Exception as exc:
            logger.warning("could not tell the tensor-parallel workers to stop: %s", exc)

    threading.Thread(target=run, name="spindle-tp-stop", daemon=True).start()
    return done.wait(seconds)


def start_engine_rank(config: EngineConfig, spec: ModelSpec, worker_main: WorkerMain) -> LocalRank:
    """Rank 0's setup: one rank, started workers (running ``worker_main``), or the group torchrun started."""
    runtime = config.runtime
    rank = torchrun_rank()
    if rank is not None:
        world_size = int(os.environ["WORLD_SIZE"])
        if runtime.tensor_parallel_size not in (1, world_size):
            raise ConfigError(
                f"tensor_parallel_size {runtime.tensor_parallel_size} differs from torchrun's WORLD_SIZE {world_size}"
            )
        if rank != 0:
            raise ConfigError(f"rank {rank} runs the worker loop, not an engine")
        local = _join(config, spec, 0, world_size, "env://")
        atexit.register(local.close)  # the other ranks leave their loop when this process ends
        return local
    world_size = runtime.tensor_parallel_size
    if world_size == 1:
        device = torch.device(runtime.device)
        return LocalRank(TensorParallelGroup(TensorShard.whole(spec)), device, _num_threads(config, 1))
    TensorShard.of(spec, 0, world_size)  # refuses an impossible split before any process starts
    _check_devices(config, world_size)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    if dist.is_initialized():
        raise ConfigError("this process already runs a tensor-parallel engine: close it first (LLM.close())")
    processes = [
        _start_worker(WorkerArgs(rank, world_size, init_method, config, spec, worker_main))
        for rank in range(1, world_size)
    ]
    try:
        local = _join_watching(processes, lambda: _join(config, spec, 0, world_size, init_method))
    except BaseException:
        for process in processes:
            process.kill()
            process.wait()
        raise
    local.processes = processes
    atexit.register(local.close)
    logger.info(
        "tensor parallelism: %d ranks (%s), worker pids %s, %d thread(s) per rank",
        world_size,
        _comm_backend(local.device),
        [p.pid for p in processes],
        local.num_threads,
    )
    return local


def _start_worker(args: WorkerArgs) -> subprocess.Popen[bytes]:
    # The worker imports Spindle from where this process did, whatever its working directory and sys.path.
    source_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "engine.parallel.worker"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, env=env)  # its output goes where this process's goes
    assert process.stdin is not None
    process.stdin.write(pickle.dumps(args))
    process.stdin.close()
    return process


def _join_watching(processes: list[subprocess.Popen[bytes]], join: Callable[[], LocalRank]) -> LocalRank:
    """Run ``join`` (which waits for every rank) while watching the started workers: one that exits before
    joining fails the start-up at once instead of after the rendezvous timeout."""
    outcome: list[LocalRank | BaseException] = []

    def run() -> None:
        try:
            outcome.append(join())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name="spindle-tp-join", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        for rank, process in enumerate(processes, start=1):
            if process.poll() is not None:
                raise WorkerGroupError(
                    f"tensor-parallel rank {rank} exited with code {process.returncode} before joining the group"
                )
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def join_worker_rank(config: EngineConfig, spec: ModelSpec, rank: int, world_size: int, init_method: str) -> LocalRank:
    return _join(config, spec, rank, world_size, init_method)


def _join(config: EngineConfig, spec: ModelSpec, rank: int, world_size: int, init_method: str) -> LocalRank:
    shard = TensorShard.of(spec, rank, world_size)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if torchrun_rank() is not None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if torchrun_rank() is not None else rank
    device = torch.device(config.runtime.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = _comm_backend(device)
    # The default group only meets the ranks (each may still be importing); steps run in join's groups.
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=STARTUP_TIMEOUT)
    tp = TensorParallelGroup.join(shard, backend, timedelta(seconds=config.runtime.tensor_parallel_timeout))
    return LocalRank(tp, device, _num_threads(config, local_ranks))


def _num_threads(config: EngineConfig, local_ranks: int) -> int:
    """The configured count, else this machine's cores shared evenly by the ranks on it."""
    return config.runtime.num_threads or max(1, len(os.sched_getaffinity(0)) // local_ranks)


def _comm_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _check_devices(config: EngineConfig, world_size: int) -> None:
    if torch.device(config.runtime.device).type == "cuda" and torch.cuda.device_count() < world_size:
        raise ConfigError(
            f"tensor_parallel_size {world_size} needs {world_size} GPUs, {torch.cuda.device_count()} visible"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
