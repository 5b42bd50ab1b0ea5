"""A schemathesis check for what JSON Schema cannot say about a stream: `data: [DONE]` once and last, and exactly one
finish_reason per choice (n per prompt); for the Responses API's typed events, their names, numbering and end; a
stream the client stopped reading early is checked only for framing.
Used by tests/test_fuzz_openapi.py and, as a hooks module, by
bench/soak_fuzz.py (`SCHEMATHESIS_HOOKS=tests.soak.sse_check st run ...`)."""

from __future__ import annotations

import json
from typing import Any

import schemathesis


def _expected_choices(path: str, body: Any) -> int | None:
    if not isinstance(body, dict):
        return None
    n = body.get("n", 1)
    if not isinstance(n, int):
        return None
    if path.endswith("/chat/completions"):
        return n
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return n * len(prompt)  # several prompts: strings or lists of token ids
    return n


_RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed", "error")


def typed_events_contract(text: str, complete: bool) -> None:
    """/v1/responses: `event: <type>\\ndata: <json with that type>` events numbered 0, 1, ...; response.created
    first; a complete stream ends with one final event (or an error event) and has no [DONE]."""
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block[:200]
        event = json.loads(lines[1][len("data: "):])
        assert lines[0] == "event: " + event["type"], f"event name {lines[0]!r} but data type {event['type']!r}"
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events))), "sequence numbers"
    assert events[0]["type"] == "response.created", events[0]["type"]
    if complete:
        ends = [e["type"] for e in events if e["type"] in _RESPONSE_ENDS]
        assert ends == [events[-1]["type"]], f"final events {ends}, last {events[-1]['type']}"


@schemathesis.check
def sse_contract(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code != 200 or not response.headers.get("content-type", [""])[0].startswith(
            "text/event-stream"):
        return None
    text = response.content.decode("utf-8")
    if response.stream_cut_short:  # the client stopped reading (its max-stream-events): only whole events count
        text = text[:text.rfind("\n\n") + 2]
        if not text:
            return None
    assert text.endswith("\n\n"), f"stream cut: {text[-100:]!r}"
    if case.operation.path == "/v1/messages":
        return _anthropic_contract(text, response.stream_cut_short)
    if case.operation.path.endswith("/responses"):
        typed_events_contract(text, not response.stream_cut_short)
        return True
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), "an event is not `data: ...`"
    data = [e[len("data: "):] for e in events]
    if response.stream_cut_short:
        assert "[DONE]" not in data[:-1], "events after [DONE]"
        return True
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1, f"[DONE] not once and last: {data[-2:]}"
    chunks = [json.loads(d) for d in data[:-1]]
    if any("error" in c for c in chunks):
        return None  # an error event ends a stream early; its shape is the schema's business
    finishes: dict[int, int] = {}
    for c in chunks:
        for choice in c["choices"]:
            if choice["finish_reason"] is not None:
                finishes[choice["index"]] = finishes.get(choice["index"], 0) + 1
    expected = _expected_choices(case.operation.path, case.body)
    if expected is not None:
        assert sorted(finishes) == list(range(expected)), f"finish_reason indexes {sorted(finishes)}, " \
                                                          f"expected {expected} choices"
    assert all(v == 1 for v in finishes.values()), f"finish_reason counts per choice: {finishes}"
    return True


def _anthropic_contract(text: str, cut_short: bool) -> bool:
    """Anthropic's named events: `event: T` + `data: {"type": T, ...}`; message_start first; each block started,
    given deltas and stopped at its own index, in order; one message_delta, then message_stop last (or an error
    event ends it)."""
    events = []
    for e in text[:-2].split("\n\n"):
        head, _, data = e.partition("\n")
        assert head.startswith("event: ") and data.startswith("data: "), f"not `event:` + `data:`: {e[:100]!r}"
        payload = json.loads(data[len("data: "):])
        assert payload["type"] == head[len("event: "):], e[:100]
        events.append(payload)
    if cut_short:
        return True
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start", kinds[:3]
    if kinds[-1] == "error":
        return True
    assert kinds[-1] == "message_stop" and kinds.count("message_stop") == 1, kinds[-3:]
    assert kinds.count("message_delta") == 1 and kinds[-2] == "message_delta", kinds[-3:]
    open_index, next_index = None, 0
    for e in events:
        if e["type"] == "content_block_start":
            assert open_index is None and e["index"] == next_index, (open_index, e)
            open_index, next_index = e["index"], next_index + 1
        elif e["type"] in ("content_block_delta", "content_block_stop"):
            assert e["index"] == open_index, (open_index, e)
            if e["type"] == "content_block_stop":
                open_index = None
    assert open_index is None, "a block was never stopped"
    return True
