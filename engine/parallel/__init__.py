"""Tensor parallelism: which shard each rank holds (shard.py), the collectives between ranks (group.py), starting and
watching the worker processes (launch.py) and a worker's step loop (worker.py)."""
