"""A separate, smaller draft model: opened and checked against the target at start-up."""

from __future__ import annotations

from engine.errors import ConfigError, ModelLoadError
from engine.loader import ModelSource, open_model


def open_draft_model(path: str, target: ModelSource) -> ModelSource:
    """The draft model at ``path``, refused with a clear error unless it tokenizes exactly as the target does (its
    tokens are the target's)."""
    try:
        draft = open_model(path)
    except ModelLoadError as exc:
        raise ConfigError(f"draft_model: {exc}") from exc
    if draft.tokenizer.vocabulary() != target.tokenizer.vocabulary():
        raise ConfigError(
            f"draft_model {path}: its tokenizer differs from the target model's ({draft.tokenizer.vocab_size} "
            f"against {target.tokenizer.vocab_size} tokens, or other token ids): a draft must share the tokenizer"
        )
    if draft.spec.vocab_size != target.spec.vocab_size:
        raise ConfigError(
            f"draft_model {path}: {draft.spec.vocab_size} output logits, the target has {target.spec.vocab_size}"
        )
    return draft
