"""The README's agent quick start: a plain openai tool loop against glm-serve's default model, offline.

    make serve                                   # one terminal: the server on the shipped model, port 8000
    python docs/examples/agent_quickstart.py     # another (needs `pip install openai`)

Three questions, three tools offered with each. The model picks a tool and writes its arguments; the script
runs the real Python function and sends the result back as the tool message; the model answers from it.
Everything the model decides is printed, so the transcript shows what it got right and what it did not.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from openai import OpenAI


def _int(description: str) -> dict[str, str]:
    return {"type": "integer", "description": description}


def _tool(name: str, description: str, **params: dict[str, str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": params, "required": list(params)}}}


TOOLS = [
    _tool("gcd", "Greatest Common Divisor.", a=_int("the first integer"), b=_int("the second integer")),
    _tool("is_leap_year", "Return True for leap years, False for non-leap years.", year=_int("a year")),
    _tool("upper", "Return a copy of the string converted to uppercase.",
          text={"type": "string", "description": "the text to work on"}),
]
FUNCTIONS: dict[str, Callable[..., Any]] = {  # called with the model's arguments as keywords
    "gcd": lambda a, b: math.gcd(a, b),
    "is_leap_year": lambda year: year % 4 == 0 and (year % 100 != 0 or year % 400 == 0),
    "upper": lambda text: text.upper(),
}
QUESTIONS = ["What is the greatest common divisor of 84 and 36?", "Is 1900 a leap year?",
             'Convert "silver river" to upper case.']


def as_text(value: Any) -> str:
    """A tool result as the tool message's text: strings as they are, the rest as JSON (true, 12)."""
    return value if isinstance(value, str) else json.dumps(value)


def run(client: OpenAI, model: str, question: str, max_turns: int = 3) -> str:
    """Ask `question` with the tools offered; run every call the model makes until it answers in words."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    for _ in range(max_turns):
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0,
                                               max_tokens=256)
        message = reply.choices[0].message
        if not message.tool_calls:  # an answer in words, or none (say why: e.g. reasoning used up max_tokens)
            return message.content or f"(no answer: finish_reason {reply.choices[0].finish_reason})"
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            fn = FUNCTIONS.get(call.function.name)
            try:
                result = as_text(fn(**json.loads(call.function.arguments))) if fn else "error: no such tool"
            except (TypeError, ValueError) as e:  # arguments that do not fit the function: tell the model
                result = f"error: {e}"
            print(f"  tool call: {call.function.name}({call.function.arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return f"(no answer after {max_turns} turns of tool calls)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    for question in QUESTIONS:
        print(f"user: {question}")
        print(f"assistant: {run(client, model, question)}")


if __name__ == "__main__":
    main()
