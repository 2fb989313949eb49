"""`tokenmill bench`: offline, serve, latency and concurrency benchmarks of tokenmill and its peers.

Metrics follow `../shared/benchmarking.md`; see docs/bench_harness.md. Modules: metrics (pure functions),
workloads, backends (in-process engine, OpenAI-compatible HTTP), scenarios, peers (llama.cpp and tokenmill servers,
transformers), roofline, machine, report, cli.
"""
