"""Coverage-guided fuzzing of GGUF model loading with atheris (libFuzzer for Python).

Invariant, for any bytes: `GGUFFile`, `Tokenizer.from_gguf_metadata`, `ModelConfig.from_gguf_metadata` and
`load_model` on a file holding them
return normally or raise `ModelLoadError`, within TIME_LIMIT_S and without the process's peak RSS growing more than
RSS_LIMIT_MB past its level after the seeds. Any other exception, or a breach of either bound, is a crash.

    .venv/bin/python fuzz/gguf_fuzz.py [libFuzzer flags] [corpus_dir ...]
    .venv/bin/python fuzz/gguf_fuzz.py -runs=2000 -seed=1 /tmp/gguf-corpus    # a short seeded run
    .venv/bin/python fuzz/gguf_fuzz.py -max_total_time=1800 /tmp/gguf-corpus  # half an hour
    .venv/bin/python fuzz/gguf_fuzz.py crash-1234abcd                          # replay one input

A corpus directory that is missing or empty is first seeded with small valid models (`write_seeds`). libFuzzer
writes a crashing input to ./crash-<sha1> (-artifact_prefix= moves it); keep small reproducers of real bugs under
tests/fixtures/gguf_crashes/, where tests/test_gguf_hostile.py replays them.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TIME_LIMIT_S = 2.0
RSS_LIMIT_MB = 1024  # growth of the peak over the first input's
RSS_CEILING_MB = 3072  # the whole process, well above torch's own few hundred MB
# libFuzzer flags the harness sets unless given: a hard kill for a hang outside Python (the in-process time check
# needs the input to return). libFuzzer's own memory limit is off: it reads ru_maxrss, which Linux carries from a
# parent into its children across fork and exec, so a fuzzer started by a test process of several GB was killed at
# once. The harness checks this process's own peak (VmHWM) instead.
DEFAULT_FLAGS = {"-timeout": "10", "-rss_limit_mb": "0"}
# Coverage is collected on tokenmill (atheris instruments whole top-level packages) and `gguf`, not numpy or torch.
INSTRUMENTED = ["tokenmill", "gguf"]
_SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


class InvariantViolation(AssertionError):
    """An input broke the harness's invariant: too slow or too much memory (exceptions propagate as themselves)."""


def _peak_rss_mb() -> float:
    """This process's own peak resident memory: VmHWM belongs to the address space, which exec makes anew."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_baseline_rss_mb: float | None = None
_fuzzing = False  # set by main(): this process is the fuzzer


def load_bytes(data: bytes) -> None:
    """Write `data` to a fresh file and load it the way the engine does; ModelLoadError is the one allowed failure.

    A fresh file per input: the `gguf` reader maps it, and rewriting a mapped file in place could fault (SIGBUS)
    through a mapping that outlived its input."""
    import torch

    from tokenmill.model.config import ModelConfig
    from tokenmill.model.gguf_file import GGUFFile, ModelLoadError
    from tokenmill.model.loader import load_model
    from tokenmill.tokenizer import Tokenizer

    # The input picks the weight format and the RoPE cap, so each path stays reachable from the corpus.
    fmt, dtype = ("gguf", torch.bfloat16) if len(data) % 2 else ("float", torch.float32)
    max_positions = None if len(data) % 3 == 0 else 2048
    fd, name = tempfile.mkstemp(suffix=".gguf", dir=_SCRATCH)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        f = GGUFFile(name)
        Tokenizer.from_gguf_metadata(f.metadata)
        ModelConfig.from_gguf_metadata(f.metadata, f.tensor_names())
        load_model(f, dtype, torch.device("cpu"), fmt, max_positions=max_positions)
    except ModelLoadError:
        pass
    finally:
        os.unlink(name)


def test_one_input(data: bytes) -> None:
    global _baseline_rss_mb
    started = time.perf_counter()
    load_bytes(data)
    elapsed = time.perf_counter() - started
    if elapsed > TIME_LIMIT_S:
        raise InvariantViolation(f"input of {len(data)} bytes took {elapsed:.2f}s (limit {TIME_LIMIT_S}s)")
    peak = _peak_rss_mb()
    if _fuzzing and peak > RSS_CEILING_MB:  # a test that calls the harness in its own process has its own peak
        raise InvariantViolation(f"peak RSS {peak:.0f} MB (limit {RSS_CEILING_MB} MB) on an input of {len(data)} bytes")
    if _baseline_rss_mb is None:
        _baseline_rss_mb = peak
    elif peak - _baseline_rss_mb > RSS_LIMIT_MB:
        raise InvariantViolation(f"peak RSS grew {peak - _baseline_rss_mb:.0f} MB (limit {RSS_LIMIT_MB} MB) on an "
                                 f"input of {len(data)} bytes")


def write_seeds(corpus: Path) -> list[Path]:
    """Small valid models (a few KB each) covering both architectures, tied and untied heads, and every tensor type
    the loader has a path for, plus one with metadata of every value type."""
    from tests.conftest import write_tiny_gguf

    corpus.mkdir(parents=True, exist_ok=True)
    tiny = {"layers": 1, "hidden": 16, "heads": 2, "kv_heads": 1, "ff": 16, "vocab": 8, "context": 64}
    blocks = tiny | {"hidden": 32, "ff": 32}
    all_types = {"general.flag": True, "general.small": -3, "general.big": 2**40, "general.neg": -(2**40),
                 "general.ratio": 0.5, "general.nested": [[1, 2], [3]], "general.names": ["a", "b"]}
    seeds = {
        "llama-f32.gguf": dict(tiny),
        "llama-f16-untied.gguf": tiny | {"tensor_type": "F16", "tied": False},
        "llama-q4_0.gguf": blocks | {"tensor_type": "Q4_0"},
        "qwen2-q8_0-untied.gguf": blocks | {"arch": "qwen2", "tensor_type": "Q8_0", "tied": False},
        "llama-q4_1-metadata.gguf": blocks | {"tensor_type": "Q4_1", "metadata": all_types},
    }
    return [write_tiny_gguf(corpus / name, **kwargs) for name, kwargs in seeds.items()]


def _with_default_flags(argv: list[str]) -> list[str]:
    given = {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-")}
    return argv + [f"{flag}={value}" for flag, value in DEFAULT_FLAGS.items() if flag not in given]


def _seed_empty_corpora(argv: list[str]) -> None:
    for arg in argv[1:]:
        if arg.startswith("-"):
            continue
        path = Path(arg)
        # A missing path without a suffix is a corpus to create; an existing file is an input to replay.
        if (not path.exists() and not path.suffix) or (path.is_dir() and not any(path.iterdir())):
            write_seeds(path)


def main(argv: list[str]) -> None:
    import atheris
    import torch  # imported before instrumentation starts: torch and numpy are not what is fuzzed

    global _fuzzing
    _fuzzing = True
    torch.set_num_threads(1)
    with atheris.instrument_imports(include=INSTRUMENTED):
        import gguf  # noqa: F401

        import tokenmill.model.gguf_check  # noqa: F401
        import tokenmill.model.loader  # noqa: F401
    _seed_empty_corpora(argv)
    atheris.Setup(_with_default_flags(argv), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
