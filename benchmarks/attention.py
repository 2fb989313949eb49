"""Paged attention, one layer: the fused step's C++ kernels (tokenmill/kernels/attention.cpp) against the eager
PyTorch path (tokenmill/model/attention.py) on the same cache, block tables and queries.

Cases: a prefill step (whole prompts of several lengths, 1,024 tokens by default), prefill chunks after cached keys
(`--chunks`), decode steps of many sequences
(the cache far larger than the CPU's caches) and of a few (the cache inside them). Prints median ms per layer, the
speed-up, and roofline context: GB/s of K/V read for decodes, GFLOP/s of causal attention math for prefill. The fused
kernels run twice, on a cache in ordinary 4 KiB pages and on 2 MiB transparent huge pages (the engine's default,
`kv_huge_pages`), as an A/B of that switch.

    .venv/bin/python benchmarks/attention.py
    .venv/bin/python benchmarks/attention.py --dtype float32 --threads 1 --output attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.attention.eager import AttentionMetadata, build_group, paged_attention  # noqa: E402
from tokenmill.bench.machine import median_ms  # noqa: E402
from tokenmill.kernels import cpu_kernels  # noqa: E402
from tokenmill.kv import huge_pages  # noqa: E402

BLOCK = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64, choices=[64, 128])
    parser.add_argument("--prefill-lens", default="256,200,180,150,120,100,18",
                        help="prompt lengths of the prefill step")
    parser.add_argument("--chunks", default="1024:256,2048:256",
                        help="prefill chunks after cached keys, as context:new tokens (one sequence each)")
    parser.add_argument("--decode-context", type=int, default=300, help="keys per decoding sequence")
    parser.add_argument("--decode-seqs", default="256,32", help="decode batch sizes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="JSON results")
    return parser.parse_args(argv)


class Case:
    """Sequences (context length, new tokens) laid out at shuffled blocks of one layer's cache."""

    def __init__(self, args: argparse.Namespace, sequences: list[tuple[int, int]], huge: bool, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, args.dtype)
        self.sequences = sequences
        num_blocks = sum(-(-ctx // BLOCK) for ctx, _ in sequences)
        order = torch.randperm(num_blocks, generator=generator).tolist()
        self.tables: list[list[int]] = []
        for ctx, _ in sequences:
            self.tables.append(order[: -(-ctx // BLOCK)])
            order = order[-(-ctx // BLOCK):]
        shape = (args.kv_heads, num_blocks * BLOCK, args.head_dim)
        cpu = torch.device("cpu")
        self.k_cache = huge_pages.zeros(shape, dtype, cpu, huge).copy_(torch.randn(shape, generator=generator))
        self.v_cache = huge_pages.zeros(shape, dtype, cpu, huge).copy_(torch.randn(shape, generator=generator))
        self.starts = [0]
        for _, q_len in sequences:
            self.starts.append(self.starts[-1] + q_len)
        self.q = torch.randn(self.starts[-1], args.heads, args.head_dim, generator=generator).to(dtype)
        self.slots = torch.tensor([t[p // BLOCK] * BLOCK + p % BLOCK for (ctx, q_len), t in
                                   zip(sequences, self.tables, strict=True) for p in range(ctx - q_len, ctx)])
        self.k = self.k_cache[:, self.slots].transpose(0, 1).contiguous()
        self.v = self.v_cache[:, self.slots].transpose(0, 1).contiguous()

    def fused(self, kernels, token_by_token: bool = False, exact_rows: bool = False) -> Callable[[], object]:
        """`token_by_token`: every new token as its own one-token sequence, so that the decode kernel does it all;
        `exact_rows`: the batch-invariant mode (each row as the decode kernel computes it, in shared passes)."""
        width = max(len(t) for t in self.tables)
        padded = [t + [0] * (width - len(t)) for t in self.tables]
        if token_by_token:
            rows = [(table, p + 1) for (ctx, q_len), table in zip(self.sequences, padded, strict=True)
                    for p in range(ctx - q_len, ctx)]
            tables, context = torch.tensor([t for t, _ in rows]), torch.tensor([c for _, c in rows])
            starts = torch.arange(len(rows) + 1)
        else:
            tables, context = torch.tensor(padded), torch.tensor([ctx for ctx, _ in self.sequences])
            starts = torch.tensor(self.starts)
        return lambda: kernels.paged_attention(self.q, self.k, self.v, self.k_cache, self.v_cache, starts, tables,
                                               context, BLOCK, exact_rows=exact_rows)

    def eager(self) -> Callable[[], object]:
        q_lens = [q_len for _, q_len in self.sequences]
        group = build_group(0, q_lens, [ctx for ctx, _ in self.sequences], self.tables, BLOCK, torch.device("cpu"))
        meta = AttentionMetadata(self.slots, [group])
        # Includes writing the step's K/V to their slots (a copy of T × kv_heads rows), which the fused step does
        # before calling its attention.
        return lambda: paged_attention(self.q, self.k, self.v, self.k_cache, self.v_cache, meta, BLOCK)

    def kv_bytes(self) -> int:
        element = self.k_cache.element_size()
        return sum(ctx for ctx, _ in self.sequences) * 2 * self.k_cache.shape[0] * self.k_cache.shape[2] * element

    def causal_flops(self, heads: int, head_dim: int) -> float:
        pairs = sum(q_len * ctx - q_len * (q_len - 1) / 2 for ctx, q_len in self.sequences)
        return 4.0 * pairs * heads * head_dim  # q·k and p·v, a multiply and an add each


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    build = cpu_kernels()
    if build.module is None:
        raise SystemExit(f"the CPU kernels did not build: {build.error}")
    prefill = [int(n) for n in args.prefill_lens.split(",")]
    cases = {f"prefill {len(prefill)} prompts, {sum(prefill)} tokens": [(n, n) for n in prefill]}
    for chunk in filter(None, args.chunks.split(",")):
        ctx, q_len = (int(n) for n in chunk.split(":"))
        cases[f"chunk of {q_len} at context {ctx}"] = [(ctx, q_len)]
    for seqs in (int(n) for n in args.decode_seqs.split(",")):
        cases[f"decode {seqs} × {args.decode_context} keys"] = [(args.decode_context, 1)] * seqs
    rows = []
    for name, sequences in cases.items():
        case, small_pages = Case(args, sequences, huge=True), Case(args, sequences, huge=False)
        eager_ms = median_ms(case.eager(), args.repeats)
        fused_ms = median_ms(case.fused(build.module), args.repeats)
        small_pages_ms = median_ms(small_pages.fused(build.module), args.repeats)
        del small_pages
        row = {"case": name, "eager_ms": eager_ms, "fused_ms": fused_ms, "fused_4k_pages_ms": small_pages_ms,
               "speedup": eager_ms / fused_ms,
               "fused_kv_gb_s": case.kv_bytes() / fused_ms / 1e6,
               "fused_gflop_s": case.causal_flops(args.heads, args.head_dim) / fused_ms / 1e6}
        # The chunk kernel's own A/B: the decode kernel applied token by token.
        if name.startswith(("prefill", "chunk")):
            row["fused_token_by_token_ms"] = median_ms(case.fused(build.module, token_by_token=True), args.repeats)
            row["fused_exact_rows_ms"] = median_ms(case.fused(build.module, exact_rows=True), args.repeats)
        rows.append(row)
    print(f"one layer, {args.dtype}, {args.heads} heads / {args.kv_heads} KV heads × {args.head_dim}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}\n")
    print("| case | eager ms | fused ms | speed-up | fused K/V GB/s | fused GFLOP/s | fused ms, 4 KiB pages |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['eager_ms']:.2f} | {r['fused_ms']:.2f} | {r['speedup']:.1f}× | "
              f"{r['fused_kv_gb_s']:.1f} | {r['fused_gflop_s']:.0f} | {r['fused_4k_pages_ms']:.2f} |")
    for r in rows:
        if "fused_token_by_token_ms" in r:
            print(f"\n{r['case']}: the decode kernel token by token takes {r['fused_token_by_token_ms']:.2f} ms, the "
                  f"chunk kernel {r['fused_ms']:.2f} ms ({r['fused_token_by_token_ms'] / r['fused_ms']:.1f}×), "
                  f"exact rows (--batch-invariant) {r['fused_exact_rows_ms']:.2f} ms "
                  f"({r['fused_exact_rows_ms'] / r['fused_ms']:.1f}×)")
    if args.output:
        args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "threads":
                                           torch.get_num_threads(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
