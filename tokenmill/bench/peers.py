"""Peers on the same machine: HTTP servers started on loopback (tokenmill's own, llama.cpp's) and `transformers`.

None of this is needed for CI. llama.cpp comes from the optional extra `peers`:

    .venv/bin/pip install 'llama-cpp-python[server]'   # builds llama.cpp from source: minutes on 2 cores

`transformers` (with `gguf`) comes with the `test` extra; it loads the same GGUF dequantized to dense weights.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tokenmill.bench.backends import PendingRequest, WorkerThreadBackend
from tokenmill.bench.roofline import dense_memory_model, model_config
from tokenmill.ports import free_port

LLAMA_CPP_INSTALL = "pip install 'llama-cpp-python[server]'  (or: pip install -e '.[peers]'; builds llama.cpp)"


class ManagedServer:
    """A server subprocess on loopback: started, polled until `ready_path` answers 200, stopped with SIGTERM (then
    SIGKILL). Its output goes to `log_path`."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str = "/v1/models",
                 log_path: str | Path | None = None, startup_timeout_s: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> ManagedServer:
        import httpx

        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.command, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})}, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; "
                                   f"see {self.log_path or 'its output'}: {' '.join(self.command)}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer {self.ready_path} within {self.startup_timeout_s}s")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("sse_starlette") is not None


def llama_cpp_server(model: str | Path, port: int | None = None, threads: int = 2, n_ctx: int = 4096,
                     n_batch: int = 512, extra_args: list[str] | None = None,
                     log_path: str | Path | None = None) -> ManagedServer:
    """`python -m llama_cpp.server` for `model` on 127.0.0.1. llama-cpp-python serves one request at a time (a
    lock around its single context), so concurrent requests queue inside it. `--interrupt_requests False`: by
    default it cuts a running stream short as soon as another request waits, which would end requests early."""
    if not llama_cpp_available():
        raise RuntimeError(f"llama-cpp-python's server is not installed: {LLAMA_CPP_INSTALL}")
    port = port or free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--n_ctx", str(n_ctx), "--n_batch", str(n_batch), "--interrupt_requests", "False", *(extra_args or [])]
    return ManagedServer("llama.cpp server", command, port, "/v1/models", log_path)


def tokenmill_server(engine_args: list[str], port: int | None = None,
                     log_path: str | Path | None = None) -> ManagedServer:
    """`tokenmill serve` (run as `python -m tokenmill.entrypoints.cli serve`) with the given engine arguments."""
    port = port or free_port()
    command = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port",
               str(port), "--no-access-log", "--log-level", "warning", *engine_args]
    return ManagedServer("tokenmill server", command, port, "/health", log_path)


# ---- transformers -------------------------------------------------------------------------------------------------


class TransformersBackend(WorkerThreadBackend):
    """Hugging Face `generate` (greedy) on the same GGUF, dequantized to dense `dtype` weights.

    Static batching, as `generate` works: a worker thread takes up to `batch_size` waiting requests, left-pads
    them and runs one `generate` to the batch's longest output length; a streamer timestamps every step, so each
    row's tokens get their own arrival times (a row ends at its own output length, or at EOS if not ignored).
    With all requests at t=0 (offline) that is padded batches in arrival order; one at a time it is SingleStream.
    """

    scenarios = ("offline", "latency", "concurrency", "serve")
    token_counting = "streamer"
    join_timeout_s = 120.0

    def __init__(self, model_path: str | Path, dtype: str = "bfloat16", batch_size: int = 64,
                 threads: int | None = None, name: str = "transformers", model: Any = None) -> None:
        super().__init__()
        self.name = name
        self.model_path = Path(model_path)
        self.dtype = dtype
        self.batch_size = batch_size
        self.threads = threads
        self.model: Any = model  # an already loaded model of this GGUF at `dtype` (tests), else loaded in start()
        self.tokenizer: Any = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._start_worker("bench-transformers")
        self.memory = dense_memory_model(model_config(self.model_path), self.dtype)

    def _load(self) -> None:
        import torch
        import transformers

        from tokenmill.bench.roofline import gguf_file
        from tokenmill.config import DTYPES
        from tokenmill.tokenizer import Tokenizer

        if self.threads:
            torch.set_num_threads(self.threads)
        transformers.utils.logging.disable_progress_bar()
        dtype = DTYPES[self.dtype]
        # Dense weights at the run dtype, as tokenmill runs; newer transformers would otherwise keep the GGUF blocks
        # packed whenever the `kernels` package is installed.
        options = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(
            transformers, "GgufConfig") else {}
        if self.model is None:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(self.model_path.parent), gguf_file=self.model_path.name, dtype=dtype, **options).eval()
        self.tokenizer = Tokenizer.from_gguf_metadata(gguf_file(str(self.model_path)).metadata)
        self.versions = {"transformers": transformers.__version__,
                         "attn_implementation": self.model.config._attn_implementation}

    def _prepare(self) -> None:
        import torch

        if self.tokenizer is None:
            self._load()
        elif self.threads:
            torch.set_num_threads(self.threads)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
                batch, self._incoming = self._incoming[:self.batch_size], self._incoming[self.batch_size:]
            try:
                self._generate(batch)
            except Exception as exc:
                for job in batch:
                    job.record.success, job.record.error = False, repr(exc)
                    job.record.end_time = time.perf_counter()
            for job in batch:
                self._resolve(job)

    def _generate(self, batch: list[PendingRequest]) -> None:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False
                self.steps: list[tuple[float, list[int]]] = []

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # the first call hands over the prompt ids
                    self.prompt_seen = True
                    return
                self.steps.append((time.perf_counter(), value.reshape(-1).tolist()))

            def end(self) -> None:
                pass

        prompts = [self.tokenizer.encode(job.request.prompt) for job in batch]
        pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        width = max(map(len, prompts))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        new_tokens = max(job.request.output_len for job in batch)
        all_ignore = all(job.ignore_eos for job in batch)
        stamps = Stamps()
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens if all_ignore else 0, pad_token_id=pad, streamer=stamps)
        done = time.perf_counter()
        stops = self.tokenizer.stop_token_ids
        for row, (job, prompt) in enumerate(zip(batch, prompts, strict=True)):
            tokens: list[int] = []
            for when, step_tokens in stamps.steps[:job.request.output_len]:
                tokens.append(step_tokens[row])
                job.record.add_chunk(when, 1)
                if not job.ignore_eos and step_tokens[row] in stops:
                    break
            job.record.prompt_tokens = len(prompt)
            job.record.output_tokens = len(tokens)
            job.record.generated_text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            job.record.end_time = done

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"model": str(self.model_path), "dtype": self.dtype,
                                     "batch_size": self.batch_size, "threads": self.threads,
                                     **getattr(self, "versions", {})}
