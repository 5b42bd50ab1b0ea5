"""Tools, reasoning and structured outputs for one chat request: what to constrain, how to read the output.

`plan_chat` looks at the request and the rendered prompt once: the grammar the decoder must follow (if any),
whether the output starts inside a reasoning block, and which parsers read it. Each choice then gets a
`ChoiceParser`; `message` builds a non-streamed message from a choice's whole text and `delta` a stream chunk's
delta from a piece of it. Both run the same incremental parsers, so a stream joined is the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from service.api import structured
from service.api.protocol import ChatCompletionRequest
from service.api.reasoning_parser import (
    THINK_OPEN,
    ChoiceDelta,
    ChoiceParser,
    GlmReasoningParser,
    prompt_opens_reasoning,
)
from service.api.tool_parser import KEY_OPEN, TOOL_OPEN, GlmToolParser, ToolCallDelta

log = logging.getLogger(__name__)


def detect_parsers(settings: Any, tokenizer: Any) -> tuple[bool, bool]:
    """(tool parser on, reasoning parser on): from the flags, or by themselves when the checkpoint's chat
    template writes GLM's tool-call / think tags (a GLM-5 checkpoint needs no flags). Logged either way."""
    text = tokenizer.chat_template_text() if tokenizer is not None and hasattr(tokenizer, "chat_template_text") \
        else ""
    tools = bool(getattr(settings, "enable_auto_tool_choice", False) or getattr(settings, "tool_call_parser", None))
    reasoning = bool(getattr(settings, "reasoning_parser", None))
    if not tools and TOOL_OPEN in text and KEY_OPEN in text:
        tools = True
        log.info("the chat template writes GLM tool calls: tool-call parser glm47 on (auto tool choice)")
    if not reasoning and THINK_OPEN in text:
        reasoning = True
        log.info("the chat template writes <think> blocks: reasoning parser glm45 on")
    log.info("tool-call parser %s, reasoning parser %s", "on" if tools else "off", "on" if reasoning else "off")
    return tools, reasoning


@dataclass
class ChatPlan:
    spec: str | None = None  # the grammar, for SamplingParams.structured
    reasoning: bool = False  # the reasoning parser reads the output
    in_reasoning: bool = False  # the prompt left a <think> block open
    tools: list[dict[str, Any]] | None = None  # the tool parser reads the output (with these schemas)
    include_reasoning: bool = True
    max_calls: int | None = None  # parallel_tool_calls: false keeps only the first call the model writes
    bad_words_token_ids: list[list[int]] = field(default_factory=list)

    def parser(self) -> ChoiceParser:
        return ChoiceParser(GlmReasoningParser(self.in_reasoning) if self.reasoning else None,
                            GlmToolParser(self.tools) if self.tools is not None else None)


async def plan_chat(req: ChatCompletionRequest, prompt: str, tokenizer: Any, tool_parser_on: bool,
                    reasoning_parser_on: bool) -> ChatPlan:
    """The plan for `req`, or a 400 (bad schema, regex or grammar: the compiler's words)."""
    plan = ChatPlan(include_reasoning=req.include_reasoning, max_calls=1 if req.parallel_tool_calls is False else None)
    plan.in_reasoning = prompt_opens_reasoning(prompt)
    plan.reasoning = reasoning_parser_on or plan.in_reasoning
    forced = req.forced_tools
    fmt, param = structured.response_format_spec(req.response_format, req.structured_outputs)
    if forced:
        # Forced calls are written in GLM's syntax whatever the template says, so they are always parsed.
        # Several calls only when the request says parallel_tool_calls: true. A forced answer otherwise holds
        # exactly one call: small models (the shipped 4-layer one of old) chained calls until max_tokens.
        parallel = req.parallel_tool_calls is True and req.tool_choice == "required"
        fmt, param = structured.tool_call_format(forced, parallel=parallel), "tools"
        plan.tools = req.tools
    elif req.tools and tool_parser_on:
        if req.tool_choice == "none":
            fmt = fmt or structured.no_tool_call_format()  # free text that never opens a call
        else:
            plan.tools = req.tools
    plan.spec = structured.build_spec(fmt, plan.in_reasoning)
    if plan.spec is not None:
        await asyncio.to_thread(structured.check, plan.spec, param)
    plan.bad_words_token_ids = bad_words_ids(req.bad_words, tokenizer)
    return plan


async def completion_constraints(req: Any, tokenizer: Any) -> tuple[list[list[int]], str | None]:
    """/v1/completions: (bad_words token ids, the grammar of response_format / structured_outputs or None)."""
    fmt, param = structured.response_format_spec(req.response_format, req.structured_outputs)
    spec = structured.build_spec(fmt, reasoning=False)
    if spec is not None:
        await asyncio.to_thread(structured.check, spec, param)
    return bad_words_ids(req.bad_words, tokenizer), spec


def bad_words_ids(words: list[str] | None, tokenizer: Any) -> list[list[int]]:
    """vLLM's rule: each word is banned as tokenized alone and after a space."""
    out: list[list[int]] = []
    for word in words or []:
        for variant in (word, " " + word):
            ids = tokenizer.encode(variant, False)
            if ids and ids not in out:
                out.append(ids)
    return out


def message(plan: ChatPlan, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice, and its finish_reason ("tool_calls" once a call was made)."""
    parser = plan.parser()
    d = parser.feed(text)
    tail = parser.finish()
    reasoning, content = d.reasoning + tail.reasoning, d.content + tail.content
    calls: dict[int, dict[str, Any]] = {}
    for c in _kept(plan, d.calls + tail.calls):
        if c.id is not None:
            calls[c.index] = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
        calls[c.index]["function"]["arguments"] += c.arguments
    msg: dict[str, Any] = {"role": "assistant", "content": content if content or not (calls or reasoning) else None}
    if plan.reasoning and plan.include_reasoning:
        msg["reasoning_content"] = msg["reasoning"] = reasoning or None
    if plan.tools is not None:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg, _finish(bool(calls), finish_reason)


def delta(plan: ChatPlan, parser: ChoiceParser, text: str, finished: bool) -> dict[str, Any]:
    """The stream delta for a piece of a choice's text (and, when it is the last, what the parsers held)."""
    d = parser.feed(text) if text else ChoiceDelta()
    if finished:
        tail = parser.finish()
        d = ChoiceDelta(d.reasoning + tail.reasoning, d.content + tail.content, d.calls + tail.calls)
    out: dict[str, Any] = {}
    if d.reasoning and plan.include_reasoning:
        out["reasoning_content"] = out["reasoning"] = d.reasoning
    if d.content:
        out["content"] = d.content
    kept = _kept(plan, d.calls)
    if kept:
        out["tool_calls"] = []
        for c in kept:
            last = out["tool_calls"][-1] if out["tool_calls"] else None
            if c.id is None and last is not None and last["index"] == c.index:
                last["function"]["arguments"] += c.arguments  # one entry per call per chunk
            elif c.id is not None:
                out["tool_calls"].append({"index": c.index, "id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": ""}})
            else:
                out["tool_calls"].append({"index": c.index, "function": {"arguments": c.arguments}})
    return out


def _kept(plan: ChatPlan, calls: list[ToolCallDelta]) -> list[ToolCallDelta]:
    return calls if plan.max_calls is None else [c for c in calls if c.index < plan.max_calls]


def stream_finish_reason(parser: ChoiceParser, finish_reason: str | None) -> str | None:
    return _finish(parser.called, finish_reason)


def _finish(called: bool, finish_reason: str | None) -> str | None:
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
