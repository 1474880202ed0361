"""How many draft rows each speculating request reserves per step: lengthened after a fully accepted draft, back to
the configured length after a rejection, and (for a drafter without a distribution to stop on) paused for a few
steps while a request's recent acceptance rate is low."""

from __future__ import annotations

from dataclasses import dataclass

ACCEPTANCE_SMOOTHING = 0.3  # weight of the latest step in a request's acceptance average
PAUSE_STEPS = 8  # steps a request with low acceptance goes without drafts before it tries again


@dataclass
class _History:
    length: int
    acceptance: float = 1.0  # moving average of accepted / drafted
    paused: int = 0  # steps left without drafting


class DraftLengthController:
    def __init__(
        self, initial: int, maximum: int, adaptive: bool, min_acceptance: float, pause_on_low_acceptance: bool
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.adaptive = adaptive
        self.min_acceptance = min_acceptance
        self.pause_on_low_acceptance = pause_on_low_acceptance
        self._history: dict[str, _History] = {}

    def length(self, request_id: str) -> int:
        """Rows to reserve for the request's drafts this step (0: no drafts)."""
        history = self._history.setdefault(request_id, _History(self.initial))
        if history.paused:
            history.paused -= 1
            return 0
        return history.length

    def observe(self, request_id: str, drafted: int, accepted: int) -> None:
        """A verified draft of ``drafted`` tokens of which the first ``accepted`` were kept."""
        history = self._history.get(request_id)
        if not self.adaptive or history is None or drafted == 0:
            return
        history.length = min(history.length + 1, self.maximum) if accepted == drafted else self.initial
        history.acceptance += ACCEPTANCE_SMOOTHING * (accepted / drafted - history.acceptance)
        if self.pause_on_low_acceptance and history.acceptance < self.min_acceptance:
            # Try again after the pause from the threshold: one more poor draft pauses it again.
            history.paused, history.acceptance = PAUSE_STEPS, self.min_acceptance
            history.length = self.initial

    def forget(self, request_id: str) -> None:
        self._history.pop(request_id, None)
