"""Chat template rendering compatible with Hugging Face transformers.

Chat templates are untrusted Jinja code shipped with model files. They are rendered in an immutable sandbox with
the same environment options, globals and filters that transformers provides, so that prompts render exactly as
they do for the reference implementation the templates were written against.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render_chat_template"]

# Names a message's reasoning may be given under; templates read `reasoning_content` or (gpt-oss) `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template is missing, does not compile, or failed (or refused) to render the given conversation."""


class _TemplateRaisedError(jinja2.TemplateError):
    """Raised by the template itself through `raise_exception`, so its message is the template author's."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaisedError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's builtin filter HTML-escapes its output and has no separators/sort_keys; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict` for templates, without exposing the `dict` type (and its attributes) to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace refusing underscore-prefixed attributes, which could otherwise reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # No named `self`, like jinja2's Namespace, so that `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        # Namespace resolves attribute lookups to its stored values, hence the module-level check.
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile (line {exc.lineno}): {exc.message}") from exc


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON-like types so the sandbox never sees methods of arbitrary caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars, ...) are reduced to the builtin value they wrap.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    model_dump: Callable[[], Any] | None = getattr(value, "model_dump", None)
    if callable(model_dump):
        return _plain(model_dump())
    return f"<{type(value).__name__}>"


def _prepare_message(message: Any) -> dict[str, Any]:
    message = _plain(message)
    if not isinstance(message, dict):
        raise ChatTemplateError(f"chat messages must be mappings, got {type(message).__name__}")
    # Many templates break on explicit nulls (e.g. OpenAI's `content: null` with tool calls) but handle absent keys.
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render a conversation the way `transformers`' `apply_chat_template(..., tokenize=False)` does.

    `special_tokens` (e.g. `bos_token`, `eos_token`) are template variables that `kwargs` may override.
    Raises `ChatTemplateError` for empty conversations and for any compile or render failure.
    """
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    compiled = _compile(template)
    try:
        variables = {
            **(special_tokens or {}),
            **_plain(kwargs),
            "messages": [_prepare_message(message) for message in messages],
            "tools": _plain(tools),
            "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt,
        }
        return compiled.render(variables)
    except ChatTemplateError:
        raise
    except _TemplateRaisedError as exc:
        raise ChatTemplateError(f"chat template rejected the conversation: {exc.message}") from exc
    except Exception as exc:
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc
