"""Picks the drafter the configuration names."""

from __future__ import annotations

from engine.config import SpeculativeConfig
from engine.spec.drafter import Drafter
from engine.spec.ngram import NgramDrafter


def build_drafter(config: SpeculativeConfig) -> Drafter | None:
    """The configured drafter; None when speculative decoding is off."""
    if config.speculative_method == "ngram":
        return NgramDrafter(config.ngram_min, config.ngram_max)
    return None
