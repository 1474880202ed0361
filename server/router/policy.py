"""Routing policies: the order in which to try the healthy replicas for one request.

The first replica in the order serves the request; the rest are where it is retried if that one cannot be reached
before the response starts.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Any, Protocol

from server.router.pool import Replica

_PROMPT_ROUTES = ("/v1/completions", "/v1/chat/completions")


def prefix_key(path: str, body: Any, prefix_chars: int) -> bytes | None:
    """What decides a request's replica under the prefix policy: the first ``prefix_chars`` characters of its
    prompt as the replica will see it (chat messages in order with their roles; a completion's prompt text or token
    ids). The router holds no tokenizer or chat template, so characters stand in for tokens: requests whose first
    characters agree render to prompts whose first KV blocks agree, which is what the replica's prefix cache reuses.
    None when the request has no prompt to read (the replica will judge it).
    """
    if path not in _PROMPT_ROUTES or not isinstance(body, dict):
        return None
    if path == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        text = "".join(f"<{m.get('role')}>{m.get('content')}" for m in messages if isinstance(m, dict))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch: its first prompt
        if isinstance(prompt, list):
            text = ",".join(str(token) for token in prompt)
        elif isinstance(prompt, str):
            text = prompt
        else:
            return None
    # The whole body's other fields (model, sampling) do not enter the prompt, so they do not enter the key.
    if not text:
        return None
    # surrogatepass: a lone surrogate (JSON's "\ud800") has no UTF-8 form, yet it still routes; the replica refuses it.
    return hashlib.blake2b(text[:prefix_chars].encode("utf-8", "surrogatepass"), digest_size=16).digest()


class RoutingPolicy(Protocol):
    def order(self, replicas: list[Replica], key: bytes | None) -> list[Replica]:
        """``replicas`` (the healthy ones, in configuration order) in the order to try them."""
        ...


def _least_loaded_first(replicas: list[Replica], start: int) -> list[Replica]:
    """By load, ties broken by rotating from ``start`` so that idle replicas share the work."""
    rotated = replicas[start % len(replicas) :] + replicas[: start % len(replicas)] if replicas else []
    return sorted(rotated, key=lambda replica: replica.load)  # sorted() is stable: ties keep the rotation


class RoundRobin:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def order(self, replicas: list[Replica], key: bytes | None) -> list[Replica]:
        if not replicas:
            return []
        start = next(self._turn) % len(replicas)
        return replicas[start:] + replicas[:start]


class LeastLoaded:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def order(self, replicas: list[Replica], key: bytes | None) -> list[Replica]:
        return _least_loaded_first(replicas, next(self._turn))


class PrefixAffinity:
    """Consistent hashing with bounded loads over the prompt's prefix key.

    Each key ranks the replicas by rendezvous hashing (the highest hash of key and URL first), so a prefix keeps its
    replica while replicas come and go, and only the keys of a replica that leaves move. The request goes to the
    first replica in that ranking whose load is under ``load_factor`` times the mean load (counting this request),
    so a popular prefix overflows to its second-ranked replica, the same one each time, instead of queueing behind
    itself (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018). A request without
    a key goes to the least loaded replica.
    """

    def __init__(self, load_factor: float) -> None:
        self.load_factor = load_factor
        self._turn = itertools.count()

    def order(self, replicas: list[Replica], key: bytes | None) -> list[Replica]:
        if key is None:
            return _least_loaded_first(replicas, next(self._turn))
        ranked = sorted(replicas, key=lambda replica: _rendezvous_score(key, replica.url), reverse=True)
        total = sum(replica.load for replica in replicas) + 1
        capacity = math.ceil(self.load_factor * total / len(replicas)) if replicas else 0
        for index, replica in enumerate(ranked):
            if replica.load < capacity:  # at most capacity with this request: within the bound
                return [replica, *ranked[:index], *ranked[index + 1 :]]
        return ranked  # unreachable while load_factor >= 1: some replica is at or under the mean


def _rendezvous_score(key: bytes, url: str) -> bytes:
    return hashlib.blake2b(key + url.encode(), digest_size=8).digest()


def build_policy(name: str, load_factor: float) -> RoutingPolicy:
    policies: dict[str, RoutingPolicy] = {
        "prefix": PrefixAffinity(load_factor),
        "round_robin": RoundRobin(),
        "least_loaded": LeastLoaded(),
    }
    return policies[name]  # the name was checked with the configuration
