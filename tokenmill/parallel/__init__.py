"""Parallel execution of one model across processes (tensor.py: tensor parallelism)."""
