"""Prepacked float weights (`prepack_weights`, `bf16_kernel`) A/B/C: the decoder's four matmuls over all layers of the
default model and its LM head, with bf16 weights in their plain layout (`F.linear`), in oneDNN's blocked layout and
packed for tokenmill's row-exact kernel (`FloatLinear.prepack`), at several batch sizes, the three run alternately.
Every layer has its own weights, as in a real step, so they come from memory rather than cache.

Prints median ms per pass over the layers and GFLOP/s for each, whether oneDNN's outputs are bit-identical to the
plain ones, and whether each packed kernel's rows are the bits they are alone (row-exact).

    .venv/bin/python benchmarks/prepack.py
    .venv/bin/python benchmarks/prepack.py --rows 1,256 --output prepack.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.bench.machine import machine_description, median_ms  # noqa: E402
from tokenmill.config import BF16_KERNELS  # noqa: E402
from tokenmill.model.gguf_file import GGUFFile, resolve_model_path  # noqa: E402
from tokenmill.model.linear import FloatLinear  # noqa: E402
from tokenmill.model.loader import load_model  # noqa: E402


def row_exact(layers: list[list[FloatLinear]], inputs: dict[int, torch.Tensor]) -> bool:
    """Whether every layer gives the first and the last row of its input the bits it gives them alone."""
    for per_layer in layers:
        for m in per_layer:
            x = inputs[m.in_features]
            whole = m(x)
            if not (torch.equal(m(x[:1]), whole[:1]) and torch.equal(m(x[-1:].contiguous()), whole[-1:])):
                return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--rows", default="1,16,64,256,1024", help="batch sizes (tokens per matmul)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="JSON results")
    return parser.parse_args(argv)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(GGUFFile(resolve_model_path(args.model)), torch.bfloat16, torch.device("cpu"), "float")
    plain = [[layer.qkv, layer.o, layer.gate_up, layer.down] for layer in model.layers] + [[model.lm_head]]
    arms: dict[str, list[list[FloatLinear]]] = {"plain": plain}
    for kernel in BF16_KERNELS:
        arms[kernel] = [[FloatLinear(m.weight, m.bias) for m in layers] for layers in plain]
        if not all(m.prepack(keep_weight=False, kernel=kernel) and m.packing == kernel
                   for layers in arms[kernel] for m in layers):
            raise SystemExit(f"{kernel} prepacking is not available here")
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for rows in rows_list:
        inputs = {m.in_features: torch.randn(rows, m.in_features).to(torch.bfloat16) for m in plain[0]}

        def run(layers: list[list[FloatLinear]], out: list[torch.Tensor] | None = None,
                inputs: dict[int, torch.Tensor] = inputs) -> None:
            for per_layer in layers:
                for m in per_layer:
                    x = inputs[m.in_features]
                    y = m(x)
                    if out is not None:
                        out.append(y)

        outs: dict[str, list[torch.Tensor]] = {name: [] for name in arms}
        for name, layers in arms.items():
            run(layers, outs[name])
        flops = sum(2 * rows * m.in_features * m.out_features for layers in plain for m in layers)
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.repeats):  # A, B, C, A, B, C...
            for name, layers in arms.items():
                times[name].append(median_ms(lambda layers=layers: run(layers), 1, warmup=1))
        entry: dict[str, object] = {"rows": rows, "flops": flops,
                                    "onednn_bit_identical_to_plain": all(
                                        torch.equal(a, b) for a, b in zip(outs["plain"], outs["onednn"], strict=True))}
        for name in arms:
            ms = statistics.median(times[name])
            entry |= {f"{name}_ms": ms, f"{name}_gflop_s": flops / ms / 1e6}
            if name != "plain" and rows > 1:
                entry[f"{name}_row_exact"] = row_exact(arms[name], inputs)
        results.append(entry)
    print(f"{len(plain) - 1} layers × (qkv, o, gate_up, down) + the LM head, bf16, {torch.get_num_threads()} threads; "
          f"median of {args.repeats}, alternated\n")
    print("| rows | plain ms | oneDNN ms | tokenmill ms | tokenmill vs oneDNN | plain / oneDNN / tokenmill GFLOP/s "
          "| oneDNN = plain | row-exact: oneDNN / tokenmill |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        exact = "–" if r["rows"] == 1 else (f"{'yes' if r['onednn_row_exact'] else 'no'} / "
                                             f"{'yes' if r['tokenmill_row_exact'] else 'NO'}")
        print(f"| {r['rows']} | {r['plain_ms']:.2f} | {r['onednn_ms']:.2f} | {r['tokenmill_ms']:.2f} | "
              f"{r['onednn_ms'] / r['tokenmill_ms']:.2f}× | {r['plain_gflop_s']:.0f} / {r['onednn_gflop_s']:.0f} / "
              f"{r['tokenmill_gflop_s']:.0f} | {'yes' if r['onednn_bit_identical_to_plain'] else 'no'} | {exact} |")
    if args.output:
        args.output.write_text(json.dumps({"machine": machine_description(), "threads": torch.get_num_threads(),
                                           "results": results}, indent=2))


if __name__ == "__main__":
    main()
