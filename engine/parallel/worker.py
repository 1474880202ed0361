"""A started tensor-parallel worker process (``python -m engine.parallel.worker``, from launch.py): it reads its
``WorkerArgs`` from stdin and runs the rank's main that rank 0 named in them (the engine's, engine/worker_rank.py),
which unpickling imports; so this package imports nothing above it."""

from __future__ import annotations

import pickle
import sys

from engine.parallel.launch import WorkerArgs

if __name__ == "__main__":
    started: WorkerArgs = pickle.load(sys.stdin.buffer)
    sys.exit(started.main(started.config, started.rank, started.world_size, started.init_method, started.spec))
