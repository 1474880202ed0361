"""The collectives tensor-parallel ranks run together, over ``torch.distributed``.

Two process groups over the same ranks: the *compute* group carries a step's all-reduces and the logits gather with
a short timeout (``tensor_parallel_timeout``), so a rank that stops answering fails the step instead of hanging it;
the *control* group carries the step plans that rank 0 broadcasts, with a timeout long enough for any idle spell,
since the workers wait there between steps. One rank (``world_size`` 1) runs no collective at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import WorkerGroupError
from engine.parallel.shard import TensorShard

IDLE_TIMEOUT = timedelta(days=365)  # workers wait this long for the next plan; a dead peer ends the wait at once


class TensorParallelGroup:
    def __init__(self, shard: TensorShard, compute: Any = None, control: Any = None) -> None:
        self.shard = shard
        self.rank = shard.rank
        self.world_size = shard.world_size
        self._compute = compute
        self._control = control
        self.failed = False  # a step failed: the ranks are out of step for good

    @classmethod
    def join(cls, shard: TensorShard, backend: str, timeout: timedelta) -> TensorParallelGroup:
        """Build both groups over the default process group, which the caller has initialised."""
        compute = dist.new_group(backend=backend, timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        return cls(shard, compute, control)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the row-parallel partial results of every rank (in place)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self._compute)
        return x

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor | None:
        """Every rank's [rows, vocab shard] logits -> the whole [rows, vocab] on rank 0, None on the others."""
        if self.world_size == 1:
            return local
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(local, parts, dst=0, group=self._compute)
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[:, : self.shard.vocab_size]

    def send_plan(self, plan: Any) -> None:
        """Rank 0: hand the next step (plain data; None ends the workers' loop) to every worker."""
        if self.world_size > 1:
            dist.broadcast_object_list([plan], src=0, group=self._control)

    def receive_plan(self) -> Any:
        """A worker: wait for rank 0's next step."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank got here (the control group's timeout: loading a model takes a while)."""
        if self.world_size > 1:
            dist.barrier(group=self._control)

    @contextlib.contextmanager
    def lockstep(self) -> Iterator[None]:
        """Around the work that every rank must do in the same order: any failure there leaves the ranks out of step
        (some may be waiting in a collective), so under tensor parallelism it is fatal (WorkerGroupError)."""
        if self.world_size == 1:
            yield
            return
        try:
            yield
        except Exception as exc:
            self.failed = True
            if isinstance(exc, WorkerGroupError):
                raise
            raise WorkerGroupError(f"tensor-parallel step failed on rank {self.rank}: {exc}") from exc
