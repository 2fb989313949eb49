"""The memory check's estimate (tokenmill/model/memory.py) against what loading really takes: for each weight format,
a fresh process loads the model and reports its peak resident memory above what it held before the load.

    .venv/bin/python benchmarks/load_memory.py [--model PATH] [--settings float:float32,float:bfloat16,gguf,int8]

The KV cache is kept small (`--kv-gib`) and counted apart: its pages are reserved but not touched at load, so
resident memory would not show them anyway. Pages of the memory-mapped GGUF file that the load read are resident
too, but the kernel reclaims them under pressure (`MemAvailable` counts them as available): the peak is compared
without them ("anonymous peak" = peak growth - file pages the load touched). A setting is `FORMAT[:DTYPE]` (dtype
bfloat16 when left out).

Each setting runs twice, with the allocator's freed heap handed back after the load (the default) and kept
(`TOKENMILL_MALLOC_TRIM=0`): the A/B of `memory.release_freed_memory`, as the anonymous memory still resident once
the engine is up. The peak is the trimmed run's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill.bench.machine import machine_description  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402

MIB = 2**20


def _rss(field: str = "VmRSS") -> int:
    from tokenmill.model.memory import status_bytes

    value = status_bytes(field)
    if value is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return value


def child(model: str, weight_format: str, dtype: str, kv_gib: float) -> dict[str, Any]:
    """Runs in its own process: the estimate, then the load, with resident memory before and at its peak."""
    import torch

    from tokenmill import LLM
    from tokenmill.model import memory
    from tokenmill.model.config import ModelConfig
    from tokenmill.model.gguf_file import GGUFFile

    gguf_file = GGUFFile(model)
    cfg = ModelConfig.from_gguf_metadata(gguf_file.metadata, gguf_file.tensor_names())
    need = memory.estimate(gguf_file, cfg, weight_format, getattr(torch, dtype), 0, prepack=True,
                           int8_activations=False)
    before, file_before, anon_before = _rss(), _rss("RssFile"), _rss("RssAnon")
    llm = LLM(model, weight_format=weight_format, dtype=dtype, kv_cache_memory_gib=kv_gib)
    after, file_pages, anon_after = _rss(), _rss("RssFile") - file_before, _rss("RssAnon") - anon_before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    held = llm.engine.model.weight_bytes()
    return {"estimate_weights": need.weights, "estimate_temporary": need.load_temporary, "rss_before": before,
            "rss_after": after, "rss_peak": peak, "file_pages": file_pages, "anon_after_load": anon_after,
            "decode_read_bytes": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--settings", default="float:float32,float:bfloat16,gguf,int8")
    parser.add_argument("--kv-gib", type=float, default=0.0625)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "FORMAT", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/load_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.kv_gib)))
        return
    from tokenmill.model.gguf_file import default_model_path

    model = args.model or str(default_model_path())
    rows = []
    print(f"{'setting':<18} {'estimate MiB (weights + temp)':>30} {'peak growth MiB':>16} {'file pages MiB':>15} "
          f"{'anonymous peak MiB':>19} {'estimate / anon. peak':>22} {'resident after load MiB, kept / trimmed':>41}")
    for setting in args.settings.split(","):
        fmt, _, dtype = setting.partition(":")
        dtype = dtype or "bfloat16"
        runs = {}
        for trim in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--child", model, fmt, dtype, "--kv-gib",
                                  str(args.kv_gib)], capture_output=True, text=True, check=True,
                                 env=os.environ | {"TOKENMILL_MALLOC_TRIM": trim})
            runs[trim] = json.loads(out.stdout.strip().splitlines()[-1])
        r = runs["1"] | {"setting": f"{fmt}:{dtype}", "anon_after_load_untrimmed": runs["0"]["anon_after_load"]}
        estimate = r["estimate_weights"] + r["estimate_temporary"]
        growth = r["rss_peak"] - r["rss_before"]
        anonymous = growth - r["file_pages"]
        r["ratio"] = estimate / anonymous
        rows.append(r)
        print(f"{r['setting']:<18} {estimate / MIB:>12.0f} ({r['estimate_weights'] / MIB:.0f} + "
              f"{r['estimate_temporary'] / MIB:.0f}) {growth / MIB:>16.0f} {r['file_pages'] / MIB:>15.0f} "
              f"{anonymous / MIB:>19.0f} {r['ratio']:>22.2f} "
              f"{r['anon_after_load_untrimmed'] / MIB:>30.0f} / {r['anon_after_load'] / MIB:.0f}")
    write_json({"machine": machine_description(), "model": model, "kv_gib": args.kv_gib, "rows": rows}, args.output)


if __name__ == "__main__":
    main()
