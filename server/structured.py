"""A request's structured-output fields (OpenAI's ``response_format``, vLLM's ``structured_outputs`` and its older
``guided_*`` fields) as one engine constraint, compiled (and so checked) before the request reaches the engine."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from engine.structured.compiler import GrammarCompiler
from engine.structured.spec import GrammarError, StructuredOutputs
from server.errors import APIError
from server.protocol import SamplingFields

# vLLM's field name, and how its value becomes a constraint.
_BUILDERS = {
    "json": StructuredOutputs.json_schema,
    "regex": lambda value: StructuredOutputs("regex", value),
    "choice": StructuredOutputs.choice,
    "grammar": lambda value: StructuredOutputs("grammar", value),
    "json_object": lambda _: StructuredOutputs.json_object(),
}


async def structured_outputs(request: SamplingFields, compiler: GrammarCompiler) -> StructuredOutputs | None:
    """The request's constraint, compiled into ``compiler``'s cache off the event loop; None when the output is
    free. A malformed, conflicting or unsupported constraint is a 400 naming the field."""
    found = _requested(request)
    if len(found) > 1:
        raise APIError(
            400, f"only one field may constrain the output, got {found[0][0]} and {found[1][0]}", param=found[1][0]
        )
    if not found:
        return None
    param, kind, value = found[0]
    try:
        spec = _BUILDERS[kind](value)
    except GrammarError as exc:
        raise APIError(400, f"invalid {param}: {exc}", param=param) from exc
    return await compiled(spec, param, compiler)


async def compiled(spec: StructuredOutputs, param: str, compiler: GrammarCompiler) -> StructuredOutputs:
    """``spec``, once compiled into the cache in a worker thread, carrying ``param`` for errors found while it runs;
    a 400 naming ``param`` if it does not compile."""
    try:
        await asyncio.to_thread(compiler.compile, spec)
    except GrammarError as exc:
        raise APIError(400, f"invalid {param}: {exc}", param=param) from exc
    return dataclasses.replace(spec, param=param)


def _requested(request: SamplingFields) -> list[tuple[str, str, Any]]:
    """(field, kind, value) for every field that constrains the output."""
    found = []
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", "json_object", True))
    elif response_format is not None and response_format.type == "json_schema":
        schema = None if response_format.json_schema is None else response_format.json_schema.json_schema
        if schema is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema", param="response_format")
        found.append(("response_format", "json", schema))
    if request.structured_outputs is not None:
        fields = request.structured_outputs
        unknown = sorted(fields.model_extra or {})
        if unknown:
            raise APIError(400, f"structured_outputs.{unknown[0]} is not supported", param="structured_outputs")
        values = {"json": fields.json_schema, "regex": fields.regex, "choice": fields.choice, "grammar": fields.grammar}
        values["json_object"] = fields.json_object or None
        found += [(f"structured_outputs.{kind}", kind, value) for kind, value in values.items() if value is not None]
    legacy = {"json": request.guided_json, "regex": request.guided_regex, "choice": request.guided_choice}
    legacy["grammar"] = request.guided_grammar
    found += [(f"guided_{kind}", kind, value) for kind, value in legacy.items() if value is not None]
    return found
