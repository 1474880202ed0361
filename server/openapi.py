"""The OpenAPI schema the server publishes: every status a route answers, streams described event by event."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from server.protocol import ErrorResponse

Responses = dict[int | str, dict[str, Any]]
_COMPONENTS = "#/components/schemas/"


def errors(*statuses: int) -> Responses:
    """Error responses, all in OpenAI's shape."""
    return {status: {"model": ErrorResponse, "description": HTTPStatus(status).phrase} for status in statuses}


def generation(response: type[BaseModel], chunk: type[BaseModel]) -> Responses:
    """A generation route: a JSON ``response``, or with ``stream`` server-sent events.

    Each event's data is a ``chunk``, an error (after the stream started) or the closing ``[DONE]``. Before Open API
    3.2 (FastAPI writes 3.1) a stream's ``schema`` describes one event.
    """
    payload = {"anyOf": [{"$ref": _COMPONENTS + chunk.__name__}, {"$ref": _COMPONENTS + ErrorResponse.__name__}]}
    json_payload = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    data = {"anyOf": [{"const": "[DONE]"}, json_payload]}
    event = {"type": "object", "properties": {"data": data}, "required": ["data"]}
    return _streaming(response, event)


def typed_events(response: type[BaseModel], events: list[type[BaseModel]]) -> Responses:
    """A generation route whose stream names each event (``event:`` is the data's ``type``), as the Responses API's
    does: each event's data is one of ``events``, and no ``[DONE]`` closes it."""
    payload = {"anyOf": [{"$ref": _COMPONENTS + model.__name__} for model in events]}
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    properties = {"event": {"type": "string"}, "data": data}
    return _streaming(response, {"type": "object", "properties": properties, "required": ["event", "data"]})


def _streaming(response: type[BaseModel], event: dict[str, Any]) -> Responses:
    stream = {"text/event-stream": {"schema": event}}
    return {200: {"model": response, "content": stream}} | errors(400, 401, 404, 413, 429, 503)


def customize(app: FastAPI, event_models: list[type[BaseModel]]) -> None:
    """Drop FastAPI's 422 (validation errors are 400s in OpenAI's shape here) and add the models of stream events,
    which no route returns directly, to the schema's components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI builds it once and caches it: these changes are made once
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for model in event_models:
            definition = model.model_json_schema(ref_template=_COMPONENTS + "{model}", mode="serialization")
            for name, nested in definition.pop("$defs", {}).items():
                components.setdefault(name, nested)
            components.setdefault(model.__name__, definition)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
