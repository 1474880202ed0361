"""Admission order of waiting requests."""

from bisect import insort_left, insort_right
from collections.abc import Iterator

from scheduler.request import Request


def _order(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time


class WaitingQueue:
    """Requests sorted by (priority, arrival_time): lower priority value first, then earlier arrival.

    A sorted list rather than a heap: admission walks the head in order and aborts remove from the middle. Queues
    stay small enough that the O(n) inserts are cheaper than the bookkeeping a lazy-deletion heap needs.
    """

    def __init__(self) -> None:
        self._requests: list[Request] = []

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        """The waiting requests in admission order."""
        return iter(self._requests)

    def push(self, request: Request) -> None:
        """Queue a new arrival behind requests of the same order."""
        insort_right(self._requests, request, key=_order)

    def push_front(self, request: Request) -> None:
        """Requeue a preempted request before every later arrival of its priority, and before exact ties.

        Only more urgent or older requests stay ahead of it.
        """
        insort_left(self._requests, request, key=_order)

    def peek(self) -> Request:
        return self._requests[0]

    def pop(self) -> Request:
        return self._requests.pop(0)

    def remove(self, request: Request) -> None:
        self._requests.remove(request)
