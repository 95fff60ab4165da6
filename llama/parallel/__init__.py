"""Tensor-parallel inference internals; the public entry points are in llama/distributed.py.

plan.py (who holds which slice), comm.py (process groups and collectives), control.py (rank
0's commands), model.py (ParallelTransformer), loading.py (each rank reads its slice),
health.py (heartbeats and failure reports), check.py (`python -m llama.distributed`).
"""
