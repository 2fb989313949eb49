"""How much a requantization of Q6_K tensors costs in perplexity (what the `gguf` format did to them before they had
a tile, and to a stack mixing them with Q4_K rows before such stacks ran one block layer per family), with nothing
else changed: the exact fp32 path (float weights = the file's values), once as is and once with every Q6_K tensor
replaced by its requantized values, dequantized back to fp32 — `q8` (8-bit blocks of 32, an f16 scale each:
`gguf_blocks.q8_requantize`, what the int8-activation `gguf` mode ran) and `rows` (the `int8` format's one scale per
output row, what the bf16 `gguf` mode ran). Kernels and activation rounding are out of the picture.

    .venv/bin/python benchmarks/requant_quality.py \\
        --model ~/.cache/tokenmill/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

Perplexity over the first `--windows` windows of 512 tokens of ../shared/data/tinyshakespeare_first_half.txt; also
the weights' relative RMS error. Writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM  # noqa: E402
from tokenmill.bench.machine import machine_description  # noqa: E402
from tokenmill.bench.quality import perplexity  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402
from tokenmill.model.gguf_blocks import q8_requantize  # noqa: E402
from tokenmill.model.gguf_file import GGUFFile  # noqa: E402
from tokenmill.model.linear import Int8Linear  # noqa: E402

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare_first_half.txt"


def q8_blocks(w: torch.Tensor) -> torch.Tensor:
    codes, d = q8_requantize(w)
    return (codes.float().reshape(w.shape[0], -1, 32) * d.float()[..., None]).reshape(w.shape)


def per_row(w: torch.Tensor) -> torch.Tensor:
    layer = Int8Linear.quantize(w, torch.bfloat16)
    return layer.qweight.float() * layer.scales.float()[:, None]


MODES: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {"exact": None, "q8": q8_blocks, "rows": per_row}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--types", default="Q6_K", help="tensor types to requantize")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--output", default="benchmarks/results/requant_quality.json")
    args = p.parse_args(argv)
    types = set(args.types.split(","))
    original = GGUFFile.tensor
    text = TEXT.read_text()
    results = {}
    for mode, requantize in MODES.items():
        errors: list[float] = []

        def tensor(self: GGUFFile, name: str, dtype: torch.dtype = torch.float32,
                   requantize: Callable[[torch.Tensor], torch.Tensor] | None = requantize,
                   errors: list[float] = errors) -> torch.Tensor:
            w = original(self, name, torch.float32)
            if requantize is not None and self.tensor_type(name) in types and w.dim() == 2:
                changed = requantize(w)
                errors.append(float((changed - w).pow(2).sum().sqrt() / w.pow(2).sum().sqrt()))
                w = changed
            return w.to(dtype)

        GGUFFile.tensor = tensor  # type: ignore[method-assign]
        try:
            engine = LLM(args.model, dtype="float32", num_kv_blocks=128).engine
        finally:
            GGUFFile.tensor = original  # type: ignore[method-assign]
        ppl = perplexity(engine, text, window=512, max_windows=args.windows)
        results[mode] = {"perplexity": ppl.perplexity, "tokens": ppl.tokens, "tensors": len(errors),
                         "mean_relative_rms_error": sum(errors) / len(errors) if errors else 0.0}
        print(f"{mode:6s} perplexity {ppl.perplexity:.3f} over {ppl.tokens} tokens, {len(errors)} tensors requantized, "
              f"mean relative RMS error {results[mode]['mean_relative_rms_error']:.2e}")
    write_json({"args": vars(args), "machine": machine_description(), "results": results}, Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
