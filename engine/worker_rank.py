"""A tensor-parallel worker rank (rank > 0): build this rank's shard, then run every step plan rank 0 broadcasts until
it sends None. Any failure ends the process with a non-zero code, which rank 0 notices at its next collective or
from the process's exit. A started worker process runs it through engine/parallel/worker.py, which rank 0 names it to
(``WorkerArgs.main``); under torchrun the ``spindle`` command calls it."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.loader import open_model
from engine.model_setup import build_runner, plan_kv_cache
from engine.model_spec import ModelSpec
from engine.parallel.launch import join_worker_rank

logger = logging.getLogger("spindle.parallel")


def run_worker(
    config: EngineConfig, rank: int, world_size: int, init_method: str, spec: ModelSpec | None = None
) -> int:
    """Join rank 0 (``spec``: the model's, when rank 0 sent it, so that joining needs no file read), then serve
    steps until told to stop. Returns the process's exit code."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    try:
        source = None if spec is not None else open_model(config.model.model)
        local = join_worker_rank(config, spec or source.spec, rank, world_size, init_method)
        source = source or open_model(config.model.model)
        torch.set_num_threads(local.num_threads)
        kv_plan = plan_kv_cache(config, source.spec, local.tp.shard)
        runner = build_runner(config, source, kv_plan, local.tp, local.device, progress=False)
        logger.info(
            "shard ready: KV heads %s, query heads %s, intermediate %s, vocabulary rows %s; KV cache %.1f MiB",
            local.tp.shard.kv_heads,
            local.tp.shard.heads,
            local.tp.shard.intermediate,
            local.tp.shard.vocab,
            kv_plan.num_blocks * kv_plan.layout.bytes_per_block / 2**20,
        )
        local.tp.barrier()
        while (plan := local.tp.receive_plan()) is not None:
            runner.forward(plan)
    except Exception:
        logger.exception("tensor-parallel worker failed")
        return 1
    logger.info("stopping")
    dist.destroy_process_group()
    return 0
