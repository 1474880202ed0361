"""What a request's output must match, as plain hashable data: the key under which its compiled grammar is cached."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.errors import SpindleError

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
# llguidance may parse the options as one grammar row (of their count plus one items) and then fails at the first
# token, over its row limit (LLParserLimits.max_items_in_row, 2000); a longer list also takes seconds to compile.
MAX_CHOICES = 1999


class GrammarError(SpindleError, ValueError):
    """A schema, regex or grammar is invalid, unsatisfiable, or uses a feature the grammar engine lacks."""


def error_summary(error: str) -> str:
    """The first line of an llguidance error: what went wrong, without the parser state and grammar it appends."""
    return error.split("\n", 1)[0]


@dataclass(frozen=True)
class StructuredOutputs:
    """One constraint on the output (vLLM's ``structured_outputs``).

    ``value`` holds the JSON Schema as JSON text (``json``), the regex (``regex``), the options as a JSON list
    (``choice``) or an EBNF (GBNF) or Lark grammar (``grammar``); it is empty for ``json_object`` (any JSON object).
    """

    kind: Kind
    value: str = ""
    # The request field it came from, which errors name; not part of the cache key.
    param: str = field(default="structured_outputs", compare=False)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool | str) -> StructuredOutputs:
        """A JSON Schema given as a mapping, a boolean schema, or its JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
        return cls("json", json.dumps(schema))

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredOutputs:
        if not options or not all(isinstance(option, str) for option in options):
            raise GrammarError("choice must be a non-empty list of strings")
        if len(options) > MAX_CHOICES:
            raise GrammarError(f"choice may list at most {MAX_CHOICES} options, got {len(options)}")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def json_object(cls) -> StructuredOutputs:
        return cls("json_object")
