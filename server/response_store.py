"""Stored Responses API objects: bounded, least recently used dropped first, each visible to its API key only."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from server.responses_protocol import InputItem, OutputItem, ResponseObject

ConversationItem = InputItem | OutputItem


@dataclass(frozen=True)
class StoredResponse:
    response: ResponseObject
    # What a follow-up (previous_response_id) continues from: the earlier turns, this request's input and its output.
    # Instructions are not part of it: as in OpenAI's API, each request gives its own.
    conversation: Sequence[ConversationItem]


class ResponseStore:
    """At most ``capacity`` responses. Each is filed under its owner (the API key that created it), so one key can
    neither read nor delete another's: to that key the id does not exist."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[bytes, str], StoredResponse] = OrderedDict()

    def put(self, owner: bytes, stored: StoredResponse) -> None:
        if self.capacity == 0:
            return
        key = (owner, stored.response.id)
        self._items[key] = stored
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, owner: bytes, response_id: str) -> StoredResponse | None:
        key = (owner, response_id)
        stored = self._items.get(key)
        if stored is not None:
            self._items.move_to_end(key)  # reading it (or continuing from it) is a use
        return stored

    def delete(self, owner: bytes, response_id: str) -> bool:
        return self._items.pop((owner, response_id), None) is not None

    def __len__(self) -> int:
        return len(self._items)
