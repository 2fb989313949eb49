"""Service per client under every policy (prompt tokens computed, tokens generated), for /metrics.

Bounded: past `max_clients` the client served least recently is dropped, so arbitrary client names (the OpenAI
`user` field) cannot grow memory or the metrics' label set without end.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tokenmill.request import Request

ANONYMOUS = "anonymous"  # the client of requests that name none


def client_of(request: Request) -> str:
    return request.client_id if request.client_id is not None else ANONYMOUS


@dataclass
class ClientUsage:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    counter: float | None = None  # the fair policy's virtual token counter, where that policy runs


class ClientLedger:
    def __init__(self, max_clients: int = 256) -> None:
        self.max_clients = max_clients
        self._usage: OrderedDict[str, ClientUsage] = OrderedDict()

    def charge(self, client: str, prompt_tokens: int, output_tokens: int) -> None:
        usage = self._usage.setdefault(client, ClientUsage())
        usage.prompt_tokens += prompt_tokens
        usage.generation_tokens += output_tokens
        self._usage.move_to_end(client)
        if len(self._usage) > self.max_clients:
            self._usage.popitem(last=False)

    def snapshot(self, counters: dict[str, float]) -> dict[str, ClientUsage]:
        return {client: ClientUsage(u.prompt_tokens, u.generation_tokens, counters.get(client))
                for client, u in self._usage.items()}
