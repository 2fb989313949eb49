"""Perplexity of one engine configuration over more text than `cpu_decode.py`'s quick check: the first `--windows`
windows of 512 tokens of ../shared/data/tinyshakespeare_first_half.txt, teacher-forced (`bench/quality.py`). Uses only
the public engine, so the same command compares two checkouts (run it in each).

    .venv/bin/python benchmarks/perplexity.py \\
        --model ~/.cache/tokenmill/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --weight-format gguf --gguf-activations int8 --dtype bfloat16 --windows 16

Prints and writes JSON (with the machine and the checkout's revision).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM  # noqa: E402
from tokenmill.bench.machine import git_revision, machine_description  # noqa: E402
from tokenmill.bench.quality import perplexity  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare_first_half.txt"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--weight-format", default="float")
    p.add_argument("--gguf-activations", default="bf16")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--output", default="benchmarks/results/perplexity.json")
    args = p.parse_args(argv)
    options = {"weight_format": args.weight_format, "dtype": args.dtype, "num_kv_blocks": 128}
    if args.gguf_activations != "bf16":
        options["gguf_activations"] = args.gguf_activations
    engine = LLM(args.model, **options).engine
    ppl = perplexity(engine, TEXT.read_text(), window=512, max_windows=args.windows)
    print(f"perplexity {ppl.perplexity:.3f} over {ppl.tokens} tokens ({ppl.windows} windows)")
    write_json({"args": vars(args), "machine": machine_description(), "revision": git_revision(),
                "perplexity": ppl.perplexity, "tokens": ppl.tokens}, Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
