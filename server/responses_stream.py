"""A streamed Responses API response as its typed events: ``event: <type>`` and ``data: {...}`` lines, each event
numbered (``sequence_number``), the output built item by item as the text arrives."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from server.errors import APIError
from server.protocol import DeltaToolCall
from server.responses_protocol import (
    ItemStatus,
    OutputItem,
    ResponseArgumentsDeltaEvent,
    ResponseArgumentsDoneEvent,
    ResponseContentPartEvent,
    ResponseErrorEvent,
    ResponseFunctionCall,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponseOutputItemEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from server.tool_calls import ToolCallDeltas, ToolUse


class OutputEvents:
    """The events of one response's output. Text goes into a message item, opened when the first text that is not
    whitespace arrives; with tools, each call read out of the text closes the open message and becomes a
    function_call item. Whitespace around a call is dropped, as the whole (not streamed) response drops it. The item
    being written when the output was cut off by its token limit ends "incomplete"."""

    def __init__(self, tools: ToolUse | None) -> None:
        self.items: list[OutputItem] = []  # the finished items, in output order
        self._sequence = 0
        self._calls = None if tools is None else ToolCallDeltas(tools.names)
        self._message: ResponseOutputMessage | None = None  # the open message item
        self._text = ""  # its text so far
        self._held = ""  # whitespace not sent yet

    # ------------------------------------------------------------------ whole-response events
    def lifecycle(self, kind: str, response: ResponseObject) -> str:
        return self._event(ResponseLifecycleEvent, type=kind, response=response)

    def error(self, exc: APIError) -> str:
        return self._event(ResponseErrorEvent, code=exc.code, message=exc.message, param=exc.param)

    # ------------------------------------------------------------------ output
    def feed(self, text: str, finish_reason: str | None) -> list[str]:
        """The events of one text delta (the last one with its ``finish_reason``)."""
        content, calls = text, []
        if self._calls is not None:
            delta, _ = self._calls.delta(text, finish_reason)
            content, calls = delta.content or "", delta.tool_calls or []
        events = self._content(content)
        for index, call in enumerate(calls):
            events += self._close_message("completed")
            cut = finish_reason == "length" and index == len(calls) - 1  # a call cut off comes last, with the end
            events += self._function_call(call, "incomplete" if cut else "completed")
        return events

    def finish(self, status: ItemStatus) -> list[str]:
        """Close the open message with ``status``. An output that is nothing else is one message, maybe empty."""
        events = []
        if self._message is None and not self.items:
            events += self._open_message()
        if self._message is not None:
            if self._held:
                events.append(self._delta(self._held))
            events += self._close_message(status)
        return events

    def _content(self, content: str) -> list[str]:
        self._held += content
        if self._message is None and self.items:
            self._held = self._held.lstrip()  # after a call
        if not self._held.strip():
            return []
        events = self._open_message() if self._message is None else []
        events.append(self._delta(self._held))
        return events

    def _open_message(self) -> list[str]:
        self._message = ResponseOutputMessage(status="in_progress", content=[])
        where = {"item_id": self._message.id, "output_index": len(self.items), "content_index": 0}
        return [
            self._event(
                ResponseOutputItemEvent,
                type="response.output_item.added",
                output_index=len(self.items),
                item=self._message,
            ),
            self._event(
                ResponseContentPartEvent, type="response.content_part.added", part=ResponseOutputText(text=""), **where
            ),
        ]

    def _delta(self, text: str) -> str:
        assert self._message is not None
        self._text += text
        self._held = ""
        return self._event(
            ResponseTextDeltaEvent, item_id=self._message.id, output_index=len(self.items), content_index=0, delta=text
        )

    def _close_message(self, status: ItemStatus) -> list[str]:
        if self._message is None:
            return []
        part = ResponseOutputText(text=self._text)
        message = self._message.model_copy(update={"status": status, "content": [part]})
        where = {"item_id": message.id, "output_index": len(self.items), "content_index": 0}
        events = [
            self._event(ResponseTextDoneEvent, text=self._text, **where),
            self._event(ResponseContentPartEvent, type="response.content_part.done", part=part, **where),
            self._event(
                ResponseOutputItemEvent, type="response.output_item.done", output_index=len(self.items), item=message
            ),
        ]
        self.items.append(message)
        self._message, self._text, self._held = None, "", ""
        return events

    def _function_call(self, call: DeltaToolCall, status: ItemStatus) -> list[str]:
        """A call arrives whole: its arguments are one delta."""
        arguments = call.function.arguments
        item = ResponseFunctionCall(call_id=call.id, name=call.function.name, arguments="", status="in_progress")
        done = item.model_copy(update={"arguments": arguments, "status": status})
        where = {"item_id": item.id, "output_index": len(self.items)}
        events = [
            self._event(
                ResponseOutputItemEvent, type="response.output_item.added", output_index=len(self.items), item=item
            ),
            self._event(ResponseArgumentsDeltaEvent, delta=arguments, **where),
            self._event(ResponseArgumentsDoneEvent, arguments=arguments, **where),
            self._event(
                ResponseOutputItemEvent, type="response.output_item.done", output_index=len(self.items), item=done
            ),
        ]
        self.items.append(done)
        return events

    def _event(self, model: type[BaseModel], **fields: Any) -> str:
        payload = model(sequence_number=self._sequence, **fields).model_dump()
        self._sequence += 1
        return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"
