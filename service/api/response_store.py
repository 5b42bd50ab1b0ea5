"""Stored Responses (`store: true`, the Responses API's default): what `GET /v1/responses/{id}` returns and what
`previous_response_id` continues.

An in-memory map, bounded twice: at most `size` responses (the least recently used goes first) and each for at
most `ttl` seconds. A restart forgets everything, as does every replica but the one that answered: a client that
needs durable history resends the conversation (`store: false` plus the whole `input`, as Codex does).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object as the client got it
    history: list[dict[str, Any]]  # the conversation's input items, from the first turn, before this output
    expires: float


class ResponseStore:
    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.ttl, self._clock = size, ttl, clock
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def put(self, response: dict[str, Any], history: list[dict[str, Any]]) -> None:
        if self.size <= 0:
            return
        self._expire()
        self._items[response["id"]] = StoredResponse(response, history, self._clock() + self.ttl)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        self._expire()
        entry = self._items.get(response_id)
        if entry is not None:
            self._items.move_to_end(response_id)  # read counts as use: a conversation in progress stays
        return entry

    def delete(self, response_id: str) -> bool:
        self._expire()
        return self._items.pop(response_id, None) is not None

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """The items a turn that continues `response_id` starts from: its history, then its output."""
        entry = self.get(response_id)
        return None if entry is None else entry.history + entry.response["output"]

    def _expire(self) -> None:
        now = self._clock()
        # A read moves an entry to the end, so the order is recency, not expiry: scan them all (size is small).
        for key in [k for k, v in self._items.items() if v.expires <= now]:
            del self._items[key]
