"""What the router needs to know of a request: its prompt's token ids, rendered and tokenized exactly as the
replica will (the same template and tool prompt, server/serving.py), and its prefix-cache partition. Ray-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.kv.hashing import block_hashes, digest, request_root
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.server.serving import chat_tools, render_chat
from tokenmill.tokenizer import Tokenizer

# A prompt longer than this is hashed only this far: routing needs its leading blocks, not all of them. (The hint
# keeps every token: a prefill replica computes the whole prompt.)
MAX_HINT_TOKENS = 16384


@dataclass(frozen=True)
class RouteHint:
    token_ids: tuple[int, ...]
    cache_salt: str | None = None

    def digests(self, hash_root: bytes, block_size: int) -> list[int]:
        """The digests of the prompt's full blocks, in the chain a replica with this root and block size uses.
        The last prompt token is never served from the cache, so a prompt ending on a block boundary counts one
        block fewer, as the replica's lookup does; at most MAX_HINT_TOKENS tokens are hashed."""
        root = request_root(hash_root, self.cache_salt)
        usable = min(max(len(self.token_ids) - 1, 0), MAX_HINT_TOKENS) // block_size
        return [digest(h) for h in block_hashes(self.token_ids, block_size, root, limit=usable)]


def worth_prefilling(req: CompletionRequest | ChatCompletionRequest, hint: RouteHint | None,
                     card: dict[str, Any], min_tokens: int) -> bool:
    """Whether a prefill replica should compute this request's prompt: one of at least `min_tokens`, in a request the
    decode replica (`card`: its model card) will take, naming its model id or none, the prompt and `max_tokens`
    within its context. Any other request goes straight to the decode replica, which answers it or its error
    without a remote prefill spent first (a request naming one of the model's other aliases only prefills there)."""
    if hint is None or len(hint.token_ids) < min_tokens:
        return False
    if req.model is not None and req.model != card.get("id"):
        return False
    requested = req.requested_max_tokens if isinstance(req, ChatCompletionRequest) else req.max_tokens
    limit = card.get("max_model_len")
    return isinstance(limit, int) and len(hint.token_ids) + (requested or 1) <= limit


def route_hint(tokenizer: Tokenizer, req: CompletionRequest | ChatCompletionRequest, cache_salt: str | None
               ) -> RouteHint | None:
    """The hint for a parsed request; None when its prompt cannot be rendered (the replica answers that request
    with the error) or is empty. A completion request with several prompts is routed by its first."""
    try:
        if isinstance(req, ChatCompletionRequest):
            tools, _ = chat_tools(req)
            ids = tokenizer.encode(render_chat(tokenizer, req.conversation(), tools))
        else:
            prompts = req.prompts()
            if not prompts:
                return None
            ids = tokenizer.encode(prompts[0]) if isinstance(prompts[0], str) else list(prompts[0])
    except (APIError, ValueError, TypeError):
        return None
    return RouteHint(tuple(ids), cache_salt) if ids else None
