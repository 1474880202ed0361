"""The most recent query vectors of each request, per layer, for policies that score KV rows by attention."""

from __future__ import annotations

import torch


class QueryRecorder:
    """Called by every attention layer with the step's queries; keeps the last ``window`` rows of each request.

    Per step: ``begin_step`` with each request's span in the flat batch, one call per layer in layer order, then
    ``end_step``. One gather per layer for the whole batch keeps the cost off the per-request path.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._queries: dict[str, torch.Tensor] = {}  # [layers, <= window, heads, head_dim]
        self._spans: list[tuple[str, int]] = []
        self._index: torch.Tensor | None = None
        self._layers: list[torch.Tensor] = []

    def begin_step(self, spans: list[tuple[str, int, int]], device: torch.device) -> None:
        """``spans``: (request id, first row, end row) of each request's tokens in the flat batch."""
        rows: list[int] = []
        self._spans = []
        for request_id, begin, end in spans:
            first = max(begin, end - self.window)
            rows.extend(range(first, end))
            self._spans.append((request_id, end - first))
        self._index = torch.tensor(rows, dtype=torch.long, device=device)
        self._layers = []

    def __call__(self, layer: int, queries: torch.Tensor) -> None:
        assert self._index is not None and layer == len(self._layers), "layers must report in order, once per step"
        self._layers.append(queries.index_select(0, self._index))

    def end_step(self) -> None:
        if not self._layers:
            return
        stacked = torch.stack(self._layers)  # [layers, recorded rows, heads, head_dim]
        offset = 0
        for request_id, count in self._spans:
            new = stacked[:, offset : offset + count]
            offset += count
            old = self._queries.get(request_id)
            joined = new if old is None else torch.cat((old, new), dim=1)
            self._queries[request_id] = joined[:, -self.window :].clone()
        self._index, self._layers = None, []

    def queries(self, request_id: str, layer: int) -> torch.Tensor | None:
        """[<= window, heads, head_dim] for the layer, or None if nothing was recorded."""
        recorded = self._queries.get(request_id)
        return None if recorded is None else recorded[layer]

    def drop(self, request_id: str) -> None:
        self._queries.pop(request_id, None)
