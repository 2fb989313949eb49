"""A GGUF file with another model's shapes, hyperparameters and tokenizer, and random weights: for speed
measurements where the real file cannot go (a lent GPU machine takes at most 64 MiB of files along; the bundled
model is 98 MB). With `ignore_eos` every request generates a fixed length, so the speed does not depend on the
weights' values; the tokens do, and mean nothing.

    .venv/bin/python benchmarks/random_weights.py spec spec.json            # of the bundled model: a few MB
    .venv/bin/python benchmarks/random_weights.py write spec.json out.gguf  # F16 random weights, same shapes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHAPE_KEYS = {"block_count": "layers", "embedding_length": "hidden", "attention.head_count": "heads",
              "attention.head_count_kv": "kv_heads", "feed_forward_length": "ff", "context_length": "context"}


def spec(model: str | None) -> dict[str, Any]:
    """The architecture, the shapes write_tiny_gguf takes, and every other metadata entry but general.*."""
    from tokenmill.bench.roofline import gguf_file
    from tokenmill.model.gguf_file import resolve_model_path

    f = gguf_file(str(resolve_model_path(model)))
    arch = f.metadata["general.architecture"]
    meta = {k.removeprefix(f"{arch}."): v for k, v in f.metadata.items() if not k.startswith("general.")}
    shapes = {name: meta[key] for key, name in SHAPE_KEYS.items()}
    return {"arch": arch, "shapes": shapes | {"vocab": len(meta["tokenizer.ggml.tokens"]),
                                               "tied": not f.has_tensor("output.weight")},
            "metadata": meta}


def write(spec_path: Path, out: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import write_tiny_gguf  # the tests' random-GGUF writer

    data = json.loads(spec_path.read_text())
    return write_tiny_gguf(out, arch=data["arch"], tensor_type="F16", metadata=data["metadata"], **data["shapes"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("spec", help="write a model's shapes and tokenizer as JSON")
    s.add_argument("out", type=Path)
    s.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    w = sub.add_parser("write", help="write a random-weight GGUF from a spec")
    w.add_argument("spec", type=Path)
    w.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.command == "spec":
        args.out.write_text(json.dumps(spec(args.model)))
    else:
        print(write(args.spec, args.out))


if __name__ == "__main__":
    main()
