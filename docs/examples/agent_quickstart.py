"""An agent against glm-serve's embedded model: the plain openai tool loop, with real Python functions as tools.

    make serve                                   # in one shell
    python docs/examples/agent_quickstart.py     # in another (pip install openai)

The model picks a tool from the list and writes its arguments, this script runs the function and sends the
result back as a `tool` message, and the model answers from it. Prints the transcript.
"""

from __future__ import annotations

import argparse
import calendar
import json
import math
from collections.abc import Callable
from typing import Any

from openai import OpenAI

JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def tool(fn: Callable[..., Any], description: str, **params: tuple[type, str]) -> dict[str, Any]:
    """An OpenAI `tools` entry for fn: each parameter as (python type, description)."""
    props = {name: {"type": JSON_TYPES[kind], "description": text} for name, (kind, text) in params.items()}
    return {"type": "function", "function": {"name": fn.__name__, "description": description, "parameters": {
        "type": "object", "properties": props, "required": list(params)}}}


def gcd(a: int, b: int) -> int:
    return math.gcd(a, b)


def isleap(year: int) -> bool:
    return calendar.isleap(year)


def upper(text: str) -> str:
    return text.upper()


FUNCTIONS = {f.__name__: f for f in (gcd, isleap, upper)}
TOOLS = [tool(gcd, "Greatest Common Divisor.", a=(int, "the first integer"), b=(int, "the second integer")),
         tool(isleap, "Return True for leap years, False for non-leap years.", year=(int, "a year")),
         tool(upper, "Return a copy of the string converted to uppercase.", text=(str, "the text to work on"))]
QUESTIONS = ["What is the greatest common divisor of 84 and 36?", "Was 1900 a leap year?",
             "Please write 'silver river' in capital letters."]


def result_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def ask(client: OpenAI, model: str, question: str, max_turns: int = 3) -> list[str]:
    """Run one question through the tool loop; returns the transcript lines."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    lines = [f"user: {question}"]
    for _ in range(max_turns):
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0,
                                               max_tokens=200).choices[0].message
        messages.append(reply.model_dump(exclude_none=True))
        if not reply.tool_calls:
            lines.append(f"assistant: {reply.content}")
            return lines
        for call in reply.tool_calls:
            fn = FUNCTIONS.get(call.function.name)
            try:
                args = json.loads(call.function.arguments)
                out = result_text(fn(**args)) if fn is not None else f"error: no tool {call.function.name}"
            except (TypeError, ValueError) as e:  # the model's arguments did not fit: tell it, as agents do
                out = f"error: {e}"
            lines.append(f"tool call: {call.function.name}({call.function.arguments}) -> {out}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": out})
    lines.append("(stopped after max_turns)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="unused")
    args = ap.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    for question in QUESTIONS:
        print("\n".join(ask(client, model, question)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
