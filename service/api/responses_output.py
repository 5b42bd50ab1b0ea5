"""A Responses output built from chat deltas, and the Response object around it.

`OutputBuilder` takes one choice's chat deltas (chat_agents.delta: reasoning, content, tool-call fragments) in
the order the model wrote them and keeps the output items: a `reasoning` item, a `message` with one
`output_text` part, a `function_call` per call, each opened when its kind of text starts. It also returns the
stream events that build those items (without sequence numbers: the framing adds them). A non-streamed answer
feeds the whole text through the same parser piece by piece (`feed_text`), so both paths make the same items.

Whitespace that is all a message would hold (the newline a model writes around a tool call) makes no message
item; an answer with no output at all makes one empty message.
"""

from __future__ import annotations

import uuid
from typing import Any

from service.api import chat_agents
from service.api.responses_protocol import ResponsesRequest

Event = dict[str, Any]


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputBuilder:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: int | None = None  # index of the item text still goes to
        self._calls: dict[int, int] = {}  # chat tool-call index -> output index
        self._space = ""  # whitespace content not yet given a message item

    # -- feeding -----------------------------------------------------------------------------------------------
    def feed(self, delta: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        if delta.get("reasoning_content"):
            events += self._text("reasoning", delta["reasoning_content"])
        calls = delta.get("tool_calls") or []
        # Within one delta, the end of an open call's arguments precedes any text after it, and a new call
        # follows the text before it.
        for c in calls:
            if "id" not in c:
                events += self._arguments(c["index"], c["function"]["arguments"])
        content = delta.get("content") or ""
        if content:
            opened = self._open is not None and self.items[self._open]["type"] == "message"
            if opened or content.strip():
                events += self._text("message", self._space + content)
                self._space = ""
            else:
                self._space += content
        for c in calls:
            if "id" in c:
                events += self._close()
                self._calls[c["index"]] = len(self.items)
                self._open = len(self.items)
                item = {"id": item_id("fc"), "type": "function_call", "status": "in_progress",
                        "arguments": "", "call_id": c["id"], "name": c["function"]["name"]}
                self.items.append(item)
                events.append({"type": "response.output_item.added", "output_index": self._open, "item": dict(item)})
                events += self._arguments(c["index"], c["function"]["arguments"])
        return events

    def finish(self, status: str) -> list[Event]:
        """Close the open item (`incomplete` when the response is) and every call still open."""
        item_status = "completed" if status == "completed" else "incomplete"
        events = self._close(item_status)
        if not self.items:  # nothing at all was written: one empty (or blank) message
            events += self._text("message", self._space)
            events += self._close(item_status)
        return events

    # -- items -------------------------------------------------------------------------------------------------
    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self.items[self._open]["type"] != kind:
            events += self._close()
            self._open = len(self.items)
            if kind == "reasoning":
                item: dict[str, Any] = {"id": item_id("rs"), "type": "reasoning", "summary": [], "content": []}
                part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
            else:
                item = {"id": item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
                part = {"type": "output_text", "text": "", "annotations": []}
            self.items.append(item)
            events.append({"type": "response.output_item.added", "output_index": self._open, "item": _copy(item)})
            item["content"].append(part)
            events.append({"type": "response.content_part.added", "output_index": self._open, "item_id": item["id"],
                           "content_index": 0, "part": dict(part)})
        item = self.items[self._open]
        item["content"][0]["text"] += text
        kind_event = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        event = {"type": kind_event, "output_index": self._open, "item_id": item["id"], "content_index": 0,
                 "delta": text}
        if kind == "message":
            event["logprobs"] = []
        events.append(event)
        return events

    def _arguments(self, chat_index: int, text: str) -> list[Event]:
        at = self._calls.get(chat_index)
        if at is None or not text:
            return []
        item = self.items[at]
        item["arguments"] += text
        return [{"type": "response.function_call_arguments.delta", "output_index": at, "item_id": item["id"],
                 "delta": text}]

    def _close(self, status: str = "completed") -> list[Event]:
        if self._open is None:
            return []
        at, self._open = self._open, None
        item = self.items[at]
        events: list[Event] = []
        if item["type"] == "function_call":
            events.append({"type": "response.function_call_arguments.done", "output_index": at, "item_id": item["id"],
                           "name": item["name"], "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            text_done = {"type": done, "output_index": at, "item_id": item["id"], "content_index": 0,
                         "text": part["text"]}
            if item["type"] == "message":
                text_done["logprobs"] = []
            events += [text_done, {"type": "response.content_part.done", "output_index": at, "item_id": item["id"],
                                   "content_index": 0, "part": dict(part)}]
        if "status" in item:
            item["status"] = status
        events.append({"type": "response.output_item.done", "output_index": at, "item": _copy(item)})
        return events

    @property
    def reasoning_text(self) -> str:
        return "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    out = dict(item)
    if "content" in out:
        out["content"] = [dict(p) for p in out["content"]]
    return out


def feed_text(builder: OutputBuilder, plan: chat_agents.ChatPlan, text: str) -> None:
    """A finished choice's whole text, fed as a stream would feed it (one character at a time: the parsers give
    the same text for any cut, and the items then open where the model's text changed kind)."""
    parser = plan.parser()
    for i, ch in enumerate(text):
        builder.feed(chat_agents.delta(plan, parser, ch, i == len(text) - 1))
    if not text:
        builder.feed(chat_agents.delta(plan, parser, "", True))


def status_of(finish_reason: str | None) -> str:
    """The Response status for the choice's finish_reason."""
    return {"stop": "completed", "length": "incomplete"}.get(finish_reason or "", "failed")


def response_object(req: ResponsesRequest, response_id: str, created_at: int, model: str, status: str,
                    output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """The Response, with the request's settings echoed as OpenAI echoes them."""
    fmt = (req.text or {}).get("format") or {"type": "text"}
    effort = (req.reasoning or {}).get("effort")
    return {
        "id": response_id, "object": "response", "created_at": created_at, "model": model, "status": status,
        "error": {"code": "server_error", "message": "The server stopped generating this response."}
        if status == "failed" else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "metadata": dict(req.metadata or {}), "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": effort, "summary": None}, "store": req.store,
        "temperature": req.temperature, "top_p": req.top_p, "text": {"format": fmt},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": req.echo_tools(),
        "truncation": "disabled", "user": req.user, "background": False, "usage": usage,
    }


def response_usage(input_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    # cache_write_tokens is OpenAI's count of prompt tokens written to an explicit (separately billed) cache: here
    # the prefix cache keeps blocks as a side effect, at no cost to anyone, so none are counted.
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}
