"""The Anthropic Messages answer, whole or streamed, made from the chat path's parsed output.

A chat choice's parts (reasoning, content, tool calls; `chat_agents.message` / `chat_agents.delta`) become content
blocks: `thinking`, `text`, `tool_use`. A stream is Anthropic's event sequence: `message_start`, `ping`, per block
`content_block_start`, deltas (`thinking_delta`, `text_delta`, `input_json_delta`) and `content_block_stop`, then
`message_delta` (stop_reason, usage) and `message_stop`. Tool-call arguments stream as the chat path's argument
fragments, which concatenate to the JSON of the final `input`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import pydantic_core

from service.api import chat_agents
from service.api.chat import ChatRun
from service.api.generation import Outputs
from service.api.job import Job


def usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict[str, int]:
    """Anthropic's usage: input_tokens are the prompt tokens not read from the (prefix) cache."""
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def stop_reason(run: ChatRun, finish_reason: str | None, engine_stop: int | str | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from the chat path's finish_reason and the engine's stop_reason (the stop string
    matched, or a stop token id). The length limit is `model_context_window_exceeded` when max_tokens had been cut
    to fit the context. A request the server gave up on (a drain ran out of time) ends `pause_turn`: its turn is
    unfinished, and sending it again continues it."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return ("model_context_window_exceeded" if run.context_limited else "max_tokens"), None
    if finish_reason == "stop":
        return ("stop_sequence", engine_stop) if isinstance(engine_stop, str) else ("end_turn", None)
    return "pause_turn", None


def message_id(run: ChatRun) -> str:
    """Anthropic's `msg_...` form of the run's id (the logs and the engine keep `msg-...`)."""
    return "msg_" + run.response_id.removeprefix("msg-")


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> dict[str, Any]:
    """The arguments' JSON object; a call cut short by max_tokens keeps what parsed (as the anthropic SDKs read a
    streamed call)."""
    try:
        value = pydantic_core.from_json(arguments, allow_partial=True)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole chat message (chat_agents.message) as content blocks."""
    blocks: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        blocks.append({"type": "tool_use", "id": tool_use_id(call["id"]), "name": call["function"]["name"],
                       "input": tool_input(call["function"]["arguments"])})
    return blocks


def message(response_id: str, model: str, blocks: list[dict[str, Any]], reason: str | None, sequence: str | None,
            use: dict[str, int]) -> dict[str, Any]:
    return {"id": response_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": reason, "stop_sequence": sequence, "usage": use}


class _Blocks:
    """The open content block of a stream: a delta of another kind closes it and opens the next."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def _open(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.index, self.kind = self.index + 1, block["type"]
        return events + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def close(self) -> list[dict[str, Any]]:
        if self.kind is None:
            return []
        self.kind = None
        return [{"type": "content_block_stop", "index": self.index}]

    def feed(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        """Events for one chat delta (reasoning, then content, then tool-call headers and argument fragments)."""
        events: list[dict[str, Any]] = []
        if delta.get("reasoning_content"):
            if self.kind != "thinking":
                events += self._open({"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
        if delta.get("content"):
            if self.kind != "text":
                events += self._open({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            if "id" in call:
                events += self._open({"type": "tool_use", "id": tool_use_id(call["id"]),
                                      "name": call["function"]["name"], "input": {}})
            if call["function"].get("arguments"):
                events.append(self._delta({"type": "input_json_delta", "partial_json": call["function"]["arguments"]}))
        return events


async def message_events(job: Job, run: ChatRun, outputs: Outputs) -> AsyncGenerator[dict[str, Any], None]:
    """Anthropic's stream for one chat run (n = 1). Each event's `type` is its SSE event name."""
    ctx = job.ctx
    parser, blocks = run.plan.parser(), _Blocks()
    prompt_tokens, generated, cached = len(run.prompt_ids), 0, 0
    finish: str | None = None
    engine_stop: int | str | None = None
    started = False
    async for _, out in outputs:
        generated, cached = out.num_generated_tokens, out.num_cached_tokens
        if not started:  # the first output says how much of the prompt the cache served
            started = True
            yield {"type": "message_start", "message": message(message_id(run), ctx.model_name, [], None, None,
                                                               usage(prompt_tokens, 0, cached))}
            yield {"type": "ping"}
        for o in out.outputs:
            for event in blocks.feed(chat_agents.delta(run.plan, parser, o.text, o.finish_reason is not None)):
                yield event
            if o.finish_reason is not None:
                finish = chat_agents.stream_finish_reason(parser, o.finish_reason)
                engine_stop = o.stop_reason
    for event in blocks.close():
        yield event
    reason, sequence = stop_reason(run, finish, engine_stop)
    yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
           "usage": usage(prompt_tokens, generated, cached)}
    yield {"type": "message_stop"}
    job.log_done(run.response_id, prompt_tokens, generated, [finish or "abort"])
