"""Prepacked float weights (`prepack_weights`) A/B: the decoder's four matmuls over all layers of the default model and
its LM head, with bf16 weights in their plain layout (`F.linear`) and in oneDNN's blocked layout
(`FloatLinear.prepack`), at several batch sizes. Every layer has its own weights, as in a real step, so they come from
memory rather than cache.

Prints median ms per pass over the layers and GFLOP/s for both, and checks the outputs are bit-identical.

    .venv/bin/python benchmarks/prepack.py
    .venv/bin/python benchmarks/prepack.py --rows 1,256 --output prepack.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.bench.machine import median_ms  # noqa: E402
from tokenmill.model.gguf_file import GGUFFile, resolve_model_path  # noqa: E402
from tokenmill.model.linear import FloatLinear  # noqa: E402
from tokenmill.model.loader import load_model  # noqa: E402


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
    packed = [[FloatLinear(m.weight, m.bias) for m in layers] for layers in plain]
    if not all(m.prepack(keep_weight=False) for layers in packed for m in layers):
        raise SystemExit("oneDNN prepacking is not available in this PyTorch build")
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

        want: list[torch.Tensor] = []
        got: list[torch.Tensor] = []
        run(plain, want)
        run(packed, got)
        identical = all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        flops = sum(2 * rows * m.in_features * m.out_features for layers in plain for m in layers)
        plain_ms = median_ms(lambda: run(plain), args.repeats)
        packed_ms = median_ms(lambda: run(packed), args.repeats)
        results.append({"rows": rows, "plain_ms": plain_ms, "packed_ms": packed_ms, "speedup": plain_ms / packed_ms,
                        "plain_gflop_s": flops / plain_ms / 1e6, "packed_gflop_s": flops / packed_ms / 1e6,
                        "bit_identical": identical})
    print(f"{len(plain) - 1} layers × (qkv, o, gate_up, down) + the LM head, bf16, {torch.get_num_threads()} threads; "
          f"median of {args.repeats}\n")
    print("| rows | plain ms | prepacked ms | speed-up | plain GFLOP/s | prepacked GFLOP/s | bit-identical |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['plain_ms']:.2f} | {r['packed_ms']:.2f} | {r['speedup']:.2f}× | "
              f"{r['plain_gflop_s']:.0f} | {r['packed_gflop_s']:.0f} | {'yes' if r['bit_identical'] else 'NO'} |")
    if args.output:
        args.output.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
