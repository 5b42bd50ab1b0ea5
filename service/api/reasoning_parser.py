"""GLM reasoning (`<think>...</think>`) split from content, incrementally, and the parsers of one chat choice.

GLM-5's template ends the prompt with `<think>` when thinking is on, so generation starts inside the reasoning;
`prompt_opens_reasoning` reads that off the rendered prompt instead of guessing from flags. Reasoning ends at
`</think>`, or at a `<tool_call>` (which then belongs to the content, where the tool parser finds it). A model
whose prompt does not open the block may still open it itself as the very first thing it writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.api.tool_parser import TOOL_OPEN, GlmToolParser, ToolCallDelta, _held_prefix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the rendered prompt ends inside an open `<think>` block (generation starts as reasoning)."""
    opened = prompt.rfind(THINK_OPEN)
    return opened >= 0 and prompt.rfind(THINK_CLOSE) < opened and not prompt[opened + len(THINK_OPEN):].strip()


class GlmReasoningParser:
    """feed(text) -> (reasoning, content) that are now certain; finish() releases what was held back."""

    def __init__(self, in_reasoning: bool) -> None:
        self.state = "reasoning" if in_reasoning else "start"  # start | reasoning | content
        self.buf = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        if self.state == "start":  # the model may open the block itself, as its first words
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.buf, self.state = head[len(THINK_OPEN):], "reasoning"
            elif THINK_OPEN.startswith(head) and not final:
                return "", ""
            else:
                self.state = "content"
        if self.state == "reasoning":
            ends = [(i, tag) for tag in (THINK_CLOSE, TOOL_OPEN) if (i := self.buf.find(tag)) >= 0]
            if ends:
                i, tag = min(ends)
                reasoning = self.buf[:i]
                # </think> is consumed; a <tool_call> stays for the tool parser
                self.buf = self.buf[i + len(THINK_CLOSE):] if tag == THINK_CLOSE else self.buf[i:]
                self.state = "content"
            else:
                keep = 0 if final else _held_prefix(self.buf, (THINK_CLOSE, TOOL_OPEN))
                reasoning, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return reasoning, ""
        content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        return self.feed("", final=True)


@dataclass
class ChoiceDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


class ChoiceParser:
    """Reasoning first, then tool calls in the content; either part may be off (then text passes through)."""

    def __init__(self, reasoning: GlmReasoningParser | None, tools: GlmToolParser | None) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.called = False  # at least one tool call seen

    def feed(self, text: str) -> ChoiceDelta:
        return self._route(*(self.reasoning.feed(text) if self.reasoning else ("", text)), final=False)

    def finish(self) -> ChoiceDelta:
        return self._route(*(self.reasoning.finish() if self.reasoning else ("", "")), final=True)

    def _route(self, reasoning: str, content: str, final: bool) -> ChoiceDelta:
        out = ChoiceDelta(reasoning=reasoning)
        if self.tools is None:
            out.content = content
            return out
        parsed = self.tools.feed(content)
        if final:
            parsed.extend(self.tools.finish())
        out.content, out.calls = parsed.content, parsed.calls
        self.called |= bool(parsed.calls)
        return out
