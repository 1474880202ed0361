"""Speculative decoding: drafters propose tokens, the verifier checks them in the target model's step."""

from engine.spec.drafter import Drafter, DraftRequest
from engine.spec.ngram import NgramDrafter

__all__ = ["DraftRequest", "Drafter", "NgramDrafter"]
