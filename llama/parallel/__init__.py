"""Tensor parallelism on torch.distributed: everything multi-process lives here.

runtime.py (the entry points: init_from_env, load_parallel, run_worker_loop, shutdown),
plan.py (who holds which slice), comm.py (process groups and collectives), control.py (rank
0's commands), model.py (ParallelTransformer), loading.py (each rank reads its slice),
health.py (heartbeats and failure reports), check.py (`torchrun ... -m llama.parallel`).
Imports only go one way: runtime -> the others; check -> runtime.
"""
