"""Random OpenAI requests, each sent streamed and not streamed at the same time, beside an unrelated third request.

Both copies carry the same `seed`, so they must agree: the same status (and a 4xx never a 5xx), the same choices
(text, finish_reason, logprob tokens and values within 1e-3) and the same usage. Each reply is also checked on its
own: one choice per prompt and sample, finish_reason "stop" or "length", no more tokens than max_tokens and exactly
max_tokens when the reason is "length", no stop string in the text once min_tokens is past, usage counts that add
up, and completion_tokens equal to the logprob tokens when logprobs were asked. After every round the engine must be
idle with every KV block free, and /health must answer 200.

The requests mix /v1/completions (a string, a list of strings or token ids; echo, logprobs) and
/v1/chat/completions (a system message or not, logprobs with top_logprobs, max_completion_tokens) with n,
temperature, top-p/k, min-p, the three penalties, stop strings and ids, min_tokens, ignore_eos,
skip_special_tokens and logit_bias.

    .venv/bin/python fuzz/server_consistency.py --seed 0 --requests 150
    .venv/bin/python fuzz/server_consistency.py --seed 0 --requests 150 --batch-invariant
    .venv/bin/python fuzz/server_consistency.py --batch-invariant --engine-args '{"speculative": "ngram"}'

Exits 1 when a check failed. Identity between the copies holds up to float rounding where the logits depend on the
batch (fp32 without `--batch-invariant`: docs/architecture.md, "Seeds"), so a rare sampled difference there is
expected; with `--batch-invariant` none is.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.model.gguf_file import default_model_path  # noqa: E402
from tokenmill.server.app import create_app  # noqa: E402
from tokenmill.server.async_engine import AsyncEngine  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
           "1, 2, 3, 4, 5,", "Les fleurs du printemps sont", "🙂 Emoji test: the weather today is",
           "Q: What is 12 times 7?\nA:", "<html>\n  <body>\n    <h1>", "東京は日本の首都で、",
           "Python is a programming language that " * 20]
STOPS = ["\n", ".", " the", ",", "Paris", "a", "  ", "é", "\n\n", "def", "1"]
Choice = dict[str, Any]


def random_request(rng: random.Random, model: str, vocab: int) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, 24), "seed": rng.randint(0, 10**6),
                            "temperature": rng.choice([0, 0, 0.7, 1.3])}
    optional: list[tuple[float, str, Any]] = [
        (0.3, "top_p", rng.choice([0.5, 0.9, 1.0])), (0.3, "top_k", rng.choice([1, 5, 40, -1])),
        (0.2, "min_p", rng.choice([0.05, 0.2])), (0.2, "presence_penalty", rng.choice([-1.0, 0.5, 2.0])),
        (0.2, "frequency_penalty", rng.choice([-0.5, 1.0])), (0.2, "repetition_penalty", rng.choice([0.8, 1.3])),
        (0.35, "stop", rng.sample(STOPS, rng.randint(1, 3)) if rng.random() < 0.7 else rng.choice(STOPS)),
        (0.1, "stop_token_ids", [rng.randrange(vocab) for _ in range(2)]),
        (0.2, "min_tokens", rng.randint(0, body["max_tokens"])), (0.2, "ignore_eos", True),
        (0.1, "skip_special_tokens", False), (0.3, "n", rng.randint(2, 3)),
        (0.15, "logit_bias", {str(rng.randrange(vocab)): rng.choice([-100, -5, 5, 100]) for _ in range(2)}),
    ]
    body |= {name: value for p, name, value in optional if rng.random() < p}
    if rng.random() < 0.4:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
        if rng.random() < 0.3:
            body["messages"].insert(0, {"role": "system", "content": "Be brief."})
        if rng.random() < 0.4:
            body |= {"logprobs": True, "top_logprobs": rng.randint(0, 5)}
        if rng.random() < 0.2:
            body["max_completion_tokens"] = body.pop("max_tokens")
        return "/v1/chat/completions", body
    kind = rng.random()
    body["prompt"] = (rng.choice(PROMPTS) if kind < 0.6 else rng.sample(PROMPTS, 2) if kind < 0.8
                      else [rng.randrange(1, vocab) for _ in range(rng.randint(1, 12))])
    if rng.random() < 0.4:
        body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.2:
        body["echo"] = True
    return "/v1/completions", body


def _choice(text: str, finish: str | None, tokens: list[tuple[str, float | None]]) -> Choice:
    return {"text": text, "finish": finish, "tokens": tokens}


def _logprob_tokens(choice: dict[str, Any]) -> list[tuple[str, float | None]]:
    logprobs = choice.get("logprobs") or {}
    if "content" in logprobs:  # chat
        return [(e["token"], e["logprob"]) for e in logprobs["content"] or []]
    return list(zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [], strict=True))


def full_reply(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(url + path, json=body, timeout=600)
    if resp.status_code != 200:
        return {"status": resp.status_code, "body": resp.text}
    reply = resp.json()
    choices = {c["index"]: _choice(c["message"]["content"] or "" if "message" in c else c["text"], c["finish_reason"],
                                   _logprob_tokens(c)) for c in reply["choices"]}
    return {"status": 200, "choices": choices, "usage": reply["usage"]}


def streamed_reply(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    choices: dict[int, Choice] = {}
    usage = None
    with httpx.stream("POST", url + path, json=body | {"stream": True, "stream_options": {"include_usage": True}},
                      timeout=600) as resp:
        if resp.status_code != 200:
            return {"status": resp.status_code, "body": resp.read().decode()}
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for c in event["choices"]:
                entry = choices.setdefault(c["index"], _choice("", None, []))
                entry["text"] += (c["delta"].get("content") or "") if "delta" in c else c["text"]
                entry["tokens"] += _logprob_tokens(c)
                if c.get("finish_reason"):
                    if entry["finish"] is not None:
                        return {"status": -1, "body": f"two finish reasons for choice {c['index']}"}
                    entry["finish"] = c["finish_reason"]
    return {"status": 200, "choices": choices, "usage": usage}


def _same_tokens(a: list[tuple[str, float | None]], b: list[tuple[str, float | None]]) -> bool:
    def close(x: float | None, y: float | None) -> bool:
        return x == y if x is None or y is None else abs(x - y) <= 1e-3 * max(1.0, abs(x))
    return len(a) == len(b) and all(s == t and close(x, y) for (s, x), (t, y) in zip(a, b, strict=True))


def problems(body: dict[str, Any], full: dict[str, Any], streamed: dict[str, Any]) -> list[str]:
    if full["status"] != streamed["status"]:
        return [f"status {full['status']} vs streamed {streamed['status']}: {full.get('body', '')[:300]} | "
                f"{streamed.get('body', '')[:300]}"]
    if full["status"] != 200:
        return [f"status {full['status']}: {full['body'][:300]}"] if full["status"] >= 500 else []
    prompts = body.get("prompt")
    count = (len(prompts) if isinstance(prompts, list) and isinstance(prompts[0], str) else 1) * body.get("n", 1)
    found = []
    for name, reply in (("full", full), ("streamed", streamed)):
        if sorted(reply["choices"]) != list(range(count)):
            found.append(f"{name}: choice indices {sorted(reply['choices'])}, expected {count}")
    if full["usage"] != streamed["usage"]:
        found.append(f"usage {full['usage']} vs streamed {streamed['usage']}")
    usage = full["usage"]
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        found.append(f"usage does not add up: {usage}")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    stops = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop", [])
    counted = 0
    for index, mine in full["choices"].items():
        other = streamed["choices"].get(index)
        if other is not None and (mine["text"], mine["finish"]) != (other["text"], other["finish"]):
            found.append(f"choice {index}: {mine['text']!r} ({mine['finish']}) vs streamed {other['text']!r} "
                         f"({other['finish']})")
        if other is not None and not _same_tokens(mine["tokens"], other["tokens"]):
            found.append(f"choice {index}: logprobs differ from the streamed ones")
        if mine["finish"] not in ("stop", "length"):
            found.append(f"choice {index}: finish_reason {mine['finish']!r}")
        if not body.get("echo") and not body.get("min_tokens") and any(s in mine["text"] for s in stops):
            found.append(f"choice {index}: a stop string of {stops} in {mine['text']!r}")
        if "logprobs" in body and not body.get("echo"):
            n = len(mine["tokens"])
            counted += n
            if n > max_tokens or (mine["finish"] == "length" and n != max_tokens):
                found.append(f"choice {index}: {n} tokens, finish {mine['finish']}, max_tokens {max_tokens}")
    if "logprobs" in body and not body.get("echo") and counted != usage["completion_tokens"]:
        found.append(f"completion_tokens {usage['completion_tokens']} but {counted} logprob tokens")
    return found


def one_round(url: str, path: str, body: dict[str, Any], other_path: str,
              other_body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The request streamed and not, and the unrelated one, all at once."""
    replies: dict[str, dict[str, Any]] = {}
    calls = {"full": (full_reply, path, body), "streamed": (streamed_reply, path, body),
             "other": (full_reply, other_path, other_body)}

    def send(name: str) -> None:
        fn, where, what = calls[name]
        replies[name] = fn(url, where, what)

    threads = [threading.Thread(target=send, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def wait_idle(engine: AsyncEngine, timeout: float = 60.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return None
        time.sleep(0.02)
    return f"engine not idle after {timeout:.0f} s: {engine.stats()}"


def serve(engine: AsyncEngine) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-invariant", action="store_true")
    parser.add_argument("--num-kv-blocks", type=int, default=96)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--engine-args", type=json.loads, default={},
                        help='more EngineConfig fields as JSON, e.g. \'{"speculative": "ngram"}\'')
    args = parser.parse_args()
    engine = AsyncEngine.from_config(EngineConfig(**{
        "model": args.model or str(default_model_path()), "dtype": args.dtype, "device": "cpu",
        "num_kv_blocks": args.num_kv_blocks, "max_num_seqs": args.max_num_seqs, "batch_invariant": args.batch_invariant,
        **args.engine_args}))
    server, thread, url = serve(engine)
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    vocab = engine.engine.model_config.vocab_size
    rng = random.Random(args.seed)
    failed = answered = 0
    try:
        for round_ in range(args.requests):
            path, body = random_request(rng, model, vocab)
            other_path, other_body = random_request(rng, model, vocab)
            replies = one_round(url, path, body, other_path, other_body)
            found = problems(body, replies["full"], replies["streamed"])
            answered += replies["full"]["status"] == 200
            if replies["other"]["status"] >= 500:
                found.append(f"the unrelated request got {replies['other']['status']}: {json.dumps(other_body)}")
            if (idle := wait_idle(engine)) is not None:
                found.append(idle)
            if httpx.get(url + "/health").status_code != 200:
                found.append("/health is not 200")
            if found:
                failed += 1
                print(f"[{round_}] {path} {json.dumps(body, ensure_ascii=False)[:400]}")
                for line in found[:6]:
                    print(f"    {line[:400]}")
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()
    print(f"{failed} of {args.requests} rounds failed, {answered} answered 200 (seed {args.seed}, dtype {args.dtype}, "
          f"batch_invariant {args.batch_invariant}, engine args {args.engine_args})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
