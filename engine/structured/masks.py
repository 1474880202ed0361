"""The allowed-token masks of a step's constrained rows: computed beside the model forward, applied vectorised."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import numpy as np
import torch

from engine.structured.matcher import GrammarMatcher


@dataclass
class PendingMasks:
    """Masks being computed for ``rows`` of a step's batch of logits (one packed bit per token)."""

    rows: list[int]
    bitmask: torch.Tensor  # int32 [len(rows), ceil(vocab_size / 32)]; bit t % 32 of word t // 32 allows token t
    vocab_size: int
    done: Future[None]

    def allowed(self) -> torch.Tensor:
        """bool [len(rows), vocab_size]: which tokens each row's grammar allows (waits for the computation)."""
        return torch.from_numpy(self._allowed_bits()).bool()

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits of every token a row's grammar refuses to -inf, in place; other rows are untouched."""
        refused = np.zeros(tuple(logits.shape), dtype=bool)
        refused[self.rows, : self.vocab_size] = self._allowed_bits() == 0
        refused[self.rows, self.vocab_size :] = True  # a padded model vocabulary: the padding is never allowed
        if logits.device.type == "cpu":
            # In numpy, on this thread: a small torch op hands off to its thread pool, which costs milliseconds
            # on a busy CPU.
            np.putmask(logits.numpy(), refused, -np.inf)
        else:
            logits.masked_fill_(torch.from_numpy(refused).to(logits.device), float("-inf"))

    def _allowed_bits(self) -> np.ndarray:
        self.done.result()
        # On a little-endian host bit t % 32 of word t // 32 is bit t % 8 of byte t // 8: "little" bit order.
        return np.unpackbits(self.bitmask.numpy().view(np.uint8), axis=1, count=self.vocab_size, bitorder="little")


class GrammarMasks:
    """Starts a step's mask computation in a worker thread. llguidance computes the masks of all rows in its own
    threads without the GIL, so the work overlaps the model forward instead of following it."""

    def __init__(self) -> None:
        self._executor = llguidance.LLExecutor()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")

    def start(self, matchers: Sequence[GrammarMatcher | None]) -> PendingMasks | None:
        """Begin computing masks for the rows that have a matcher; None when no row has one."""
        constrained = [(row, matcher) for row, matcher in enumerate(matchers) if matcher is not None]
        if not constrained:
            return None
        vocab_size = constrained[0][1].vocab_size
        bitmask = torch.zeros((len(constrained), (vocab_size + 31) // 32), dtype=torch.int32)
        done = self._worker.submit(self.fill, [matcher for _, matcher in constrained], bitmask)
        return PendingMasks([row for row, _ in constrained], bitmask, vocab_size, done)

    def fill(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Write the masks of ``matchers`` into the rows of ``bitmask`` (int32, contiguous), in this thread."""
        targets = [(matcher.ll_matcher, row) for row, matcher in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(targets, bitmask.data_ptr(), bitmask.shape[1] * 4, len(targets))
