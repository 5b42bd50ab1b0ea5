"""Tool-use and thinking conversations for the training corpus, and the held-out tool prompts to evaluate on.

Every conversation is rendered with the GLM-5 chat template, so the model learns exactly the text the server
will show it. A tool conversation: the tools (the right one among 0-3 others, shuffled) in the system turn,
the user's request in one of the tool's phrasings, the assistant's call in GLM-5's format with the sampled
arguments, the observation (the real function's real result), and the assistant's answer worded from it.
With thinking on (half of them), each assistant turn starts with a short plan derived from the tool's
signature and docstring; with it off, the turn starts `<think></think>`, as the generation prompt writes it.

Held out for evaluation: the whole tools in `HELDOUT_TOOLS`, and for each training tool one phrasing (chosen
by hash). Everything is seeded: the same seed gives the same documents on every machine.

In `ALIAS_RATE` of the training documents every offered tool goes by an alias (`alias_names`), mostly a function
name of the training files, and `PARAM_RENAME_RATE` of those tools have their parameters renamed too: under an
alias the only way to the right name, and key, is to read the tool list and copy it from the tool whose
description matches the request. The other documents show the real names, which the model learns as words to
recall: that calls the training tools right under the names users send, and calls a held-out tool by a training
tool's name (runs3 called `radians` `degrees` in 6 of 12 prompts). Every list aliased (runs5, runs6) taught no
copying at this scale: in GLM-5's tool JSON the name comes before its description, so copying it takes two hops
(request -> description -> the name before it), and the model guessed the commonest alias words instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from random import Random
from typing import Any

from .tool_catalog import HELDOUT_TOOLS, TOOLS, Tool

TRAIN_TOOLS = [t for t in TOOLS if t.name not in HELDOUT_TOOLS]
EVAL_TOOLS = [t for t in TOOLS if t.name in HELDOUT_TOOLS]
MAX_DISTRACTORS = 3
# In training documents. runs5 and runs6 aliased every list (1.0): neither learned to copy a name from the list
# (at step 1,400 the model's top guesses after `<tool_call>` were the commonest alias words, "onyx", "coral",
# offered or not) and a real name never followed `<tool_call>`, so the agent quick start's real tools went
# uncalled. 0.4 (runs2, runs3, runs7): real names are recalled for the training tools, aliases keep some copying.
ALIAS_RATE = 0.4
PARAM_RENAME_RATE = 0.5  # of aliased tools (0.8 in runs5-6): keys too are copied, not recalled
# Aliases drawn from the corpus's identifiers when there is a pool (none in runs2-5; 0.6 in runs6). The 32 words
# below start few aliases: runs5 (only those and affixed real names) had learned which few words follow
# `<tool_call>`, not to copy any name.
POOL_ALIAS_SHARE = 0.8
ALIAS_WORDS = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "zeta", "amber", "cobalt", "cedar",
               "ember", "falcon", "harbor", "lotus", "maple", "meadow", "onyx", "prism", "quartz", "raven", "topaz",
               "willow", "zephyr", "orbit", "pixel", "vector", "nova", "comet", "lark", "birch", "coral"]
ALIAS_AFFIXES = ["do", "get", "calc", "run", "tool", "py", "std", "fn", "op", "v2"]
# Parameter aliases: held-out tools have keys no training tool has (`suffix`, `y1`), so keys must be copied too.
PARAM_ALIASES = ["value", "item", "arg", "data", "num", "first", "second", "input", "source", "target", "left",
                 "right", "start", "end", "size", "count", "key", "word", "amount", "limit"]
REAL_KEYS = frozenset(p.name for t in TOOLS for p in t.params)


def heldout_phrasing(tool: Tool) -> int:
    """The index of the phrasing of a training tool kept for evaluation."""
    return int.from_bytes(hashlib.sha256(f"glm-serve-phrasing:{tool.name}".encode()).digest()[:4], "big") % len(
        tool.asks)


def train_phrasings(tool: Tool) -> list[int]:
    held = heldout_phrasing(tool)
    return [i for i in range(len(tool.asks)) if i != held]


def pick_offered(rng: Random, tool: Tool | None, pool: list[Tool], n_max: int = MAX_DISTRACTORS) -> list[Tool]:
    """`tool` (when given) and up to n_max others from `pool`, shuffled."""
    others = [t for t in pool if t is not tool]
    chosen = rng.sample(others, rng.randint(0 if tool else 1, n_max))
    if tool is not None:
        chosen.append(tool)
    rng.shuffle(chosen)
    return chosen


def offered_tools(rng: Random, tool: Tool | None, pool: list[Tool], n_max: int = MAX_DISTRACTORS) -> list[dict]:
    """`pick_offered` as OpenAI `tools` entries."""
    return [t.schema() for t in pick_offered(rng, tool, pool, n_max)]


def alias_names(rng: Random, tools: list[Tool], pool: Sequence[str] = ()) -> dict[str, str]:
    """A distinct alias for each tool's name. With a `pool` of identifiers (the corpus's function names), most
    often one of them (`POOL_ALIAS_SHARE`): names after `<tool_call>` then range over thousands of identifiers
    like the ones users give their tools, and only copying finds the right one. Otherwise two unrelated words
    (`cedar_orbit`), or the real name with a prefix or suffix (`calc_gcd`, `gcd_v2`). Never a real tool's name."""
    taken = {t.name for t in TOOLS}
    names: dict[str, str] = {}
    for t in tools:
        while True:
            style = rng.random()
            if pool and rng.random() < POOL_ALIAS_SHARE:
                alias = rng.choice(pool)
            elif style < 0.6:
                alias = f"{rng.choice(ALIAS_WORDS)}_{rng.choice(ALIAS_WORDS)}"
            elif style < 0.8:
                alias = f"{rng.choice(ALIAS_AFFIXES)}_{t.name}"
            else:
                alias = f"{t.name}_{rng.choice(ALIAS_AFFIXES)}"
            if alias not in taken:
                break
        taken.add(alias)
        names[t.name] = alias
    return names


def renamed(rng: Random, tools: list[Tool], pool: Sequence[str] = ()) -> list[Tool]:
    """`tools` under their aliases (`alias_names`); `PARAM_RENAME_RATE` of them also with their parameters
    renamed (`PARAM_ALIASES`, or the real name with a digit), in the same order."""
    names = alias_names(rng, tools, pool)
    out = []
    for t in tools:
        params = t.params
        if rng.random() < PARAM_RENAME_RATE:
            keys = [f"{p.name}{rng.randint(1, 9)}" for p in params]
            if rng.random() < 0.5 or set(keys) & REAL_KEYS:  # never a real key (`y1` is a held-out tool's)
                keys = rng.sample(PARAM_ALIASES, len(params))
            params = tuple(replace(p, name=k) for p, k in zip(params, keys, strict=True))
        out.append(replace(t, name=names[t.name], params=params))
    return out


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def call_plan(tool: Tool, args: dict[str, Any]) -> str:
    """The thinking before a call: what the tool does (its docstring), its signature, the arguments."""
    given = ", ".join(f"{k} = {_show(v)}" for k, v in args.items())
    return (f"The user wants a result that {tool.name} gives: {tool.description} "
            f"Its signature is {tool.signature()}. I call it with {given}.")


def answer_plan(tool: Tool, result: str) -> str:
    return f"{tool.name} returned {result}. I answer with it."


def tool_conversation(rng: Random, tool: Tool, phrasing: int, thinking: bool, pool: list[Tool],
                      alias: bool = False, names: Sequence[str] = ()) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(messages, tools, arguments) of one tool-use conversation, the result computed by the real function;
    with `alias`, every offered tool goes by an alias (`renamed`, parameters too for some) in the tool list, the
    call and the plan."""
    args = tool.sample_args(rng)
    result = tool.run(args)
    offered = pick_offered(rng, tool, pool)
    shown = tool
    if alias:
        at = offered.index(tool)
        offered = renamed(rng, offered, names)
        shown = offered[at]
    # The call and the plan use the names shown in the tool list; the request and the answer are worded with
    # the arguments' values, whatever their keys.
    shown_args = {s.name: args[p.name] for p, s in zip(tool.params, shown.params, strict=True)}
    call = {"type": "function", "function": {"name": shown.name, "arguments": shown_args}}
    first = {"role": "assistant", "content": "", "tool_calls": [call]}
    final = {"role": "assistant", "content": tool.answer.format(**args, result=result)}
    if thinking:
        first["reasoning_content"] = call_plan(shown, shown_args)
        final["reasoning_content"] = answer_plan(shown, result)
    messages = [{"role": "user", "content": tool.asks[phrasing].format(**args)}, first,
                {"role": "tool", "content": result}, final]
    return messages, [t.schema() for t in offered], args


def code_plan(signature: str, doc: str) -> str:
    """The thinking before a code answer: the signature to write and what its docstring promises."""
    what = f" It should: {doc}" if doc else ""
    return f"I need to write {signature}.{what} I write it as one function with a docstring."


class ToolDocs:
    """Renders the tool-use documents; `template` is the GLM-5 ChatTemplate, `endoftext` closes a document."""

    def __init__(self, template: Any, endoftext: str, seed: int = 0, alias_pool: Sequence[str] = ()) -> None:
        self.template = template
        self.endoftext = endoftext
        self.seed = seed
        self.alias_pool = alias_pool  # identifiers aliases are drawn from (`alias_names`)

    def _doc(self, messages: list[dict], tools: list[dict] | None, kind: str, source: str, thinking: bool) -> dict:
        """The training record; the prompt is everything before the first assistant turn's output."""
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        kwargs = {} if thinking else {"enable_thinking": False}
        prompt = self.template.render(messages[:first], add_generation_prompt=True, tools=tools, **kwargs)
        text = self.template.render(messages, add_generation_prompt=False, tools=tools) + self.endoftext
        assert text.startswith(prompt)  # the loss mask and the server's prompt rely on it
        return {"text": text, "kind": kind, "source": source, "prompt_chars": len(prompt),
                "request": messages[first - 1]["content"]}

    def tool_docs(self, n: int, heldout: bool = False) -> Iterator[dict]:
        """n tool-use conversations over the training tools and their training phrasings, or (`heldout`) over
        the held-out tools and every phrasing (for held-out loss and MTP acceptance, never trained on). Each
        record's `called` is the name the call uses (an alias in `ALIAS_RATE` of the training ones)."""
        rng = Random(f"tool-docs:{self.seed}:{heldout}")
        catalog = EVAL_TOOLS if heldout else TRAIN_TOOLS
        for i in range(n):
            tool = catalog[i % len(catalog)]
            phrasing = rng.randrange(len(tool.asks)) if heldout else rng.choice(train_phrasings(tool))
            thinking = rng.random() < 0.5
            alias = not heldout and rng.random() < ALIAS_RATE
            messages, tools, _ = tool_conversation(rng, tool, phrasing, thinking, TRAIN_TOOLS, alias,
                                                   self.alias_pool)
            doc = self._doc(messages, tools, "tool", f"tool:{tool.name}:{phrasing}", thinking)
            yield {**doc, "called": messages[1]["tool_calls"][0]["function"]["name"]}

    def with_tools_offered(self, messages: list[dict], rng: Random, source: str, thinking: bool) -> dict:
        """A conversation that needs no tool, with 1-3 tools offered anyway (under aliases as often as in the
        tool conversations, so an odd name is no sign that a call is due): the assistant answers directly."""
        offered = pick_offered(rng, None, TRAIN_TOOLS)
        if rng.random() < ALIAS_RATE:
            offered = renamed(rng, offered, self.alias_pool)
        return self._doc(messages, [t.schema() for t in offered], "no_tool", source, thinking)


def eval_prompts(no_tool_requests: list[str], seed: int = 1, per_phrasing: int = 3) -> Iterator[dict]:
    """The held-out tool prompts: every phrasing of each held-out tool and the held-out phrasing of each
    training tool, `per_phrasing` argument draws each. Records: messages, tools, the expected tool and
    arguments, and which split (`heldout_tool` or `heldout_phrasing`). Then `no_tool` prompts: the given
    requests (held-out code requests) with 1-3 tools offered, where `tool` is None."""
    rng = Random(f"tool-eval:{seed}")
    for request in no_tool_requests:
        yield {"messages": [{"role": "user", "content": request}], "tools": offered_tools(rng, None, TRAIN_TOOLS),
               "tool": None, "arguments": None, "split": "no_tool", "phrasing": None}
    cases = [(t, i, "heldout_tool") for t in EVAL_TOOLS for i in range(len(t.asks))]
    cases += [(t, heldout_phrasing(t), "heldout_phrasing") for t in TRAIN_TOOLS]
    for tool, phrasing, split in cases:
        for _ in range(per_phrasing):
            messages, tools, args = tool_conversation(rng, tool, phrasing, False, TRAIN_TOOLS)
            yield {"messages": messages[:1], "tools": tools, "tool": tool.name, "arguments": args,
                   "split": split, "phrasing": phrasing}


_CALL = re.compile(r"<tool_call>\s*([^<\s]+)\s*"
                   r"((?:<arg_key>.*?</arg_key>\s*<arg_value>.*?</arg_value>\s*)*)</tool_call>", re.S)
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def parse_tool_calls(text: str, tools: list[dict]) -> list[dict[str, Any]]:
    """GLM-5 calls in generated text (special tokens kept) as [{"name", "arguments"}]: a value whose schema
    type is string stays raw, any other is read as JSON (raw when that fails). The inverse of the template."""
    types = {t["function"]["name"]: {k: v.get("type") for k, v in
                                     t["function"].get("parameters", {}).get("properties", {}).items()}
             for t in tools}
    calls = []
    for name, body in _CALL.findall(text):
        args: dict[str, Any] = {}
        for key, raw in _ARG.findall(body):
            if types.get(name, {}).get(key) == "string":
                args[key] = raw
                continue
            try:
                args[key] = json.loads(raw)
            except ValueError:
                args[key] = raw
        calls.append({"name": name, "arguments": args})
    return calls


def schema_valid(args: dict[str, Any], tool: dict) -> bool:
    """Whether `args` has exactly the schema's required keys, known keys only, each of its JSON type."""
    params = tool["function"]["parameters"]
    props = params.get("properties", {})
    if set(params.get("required", [])) - set(args) or set(args) - set(props):
        return False
    check = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
             "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
             "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool)}
    return all(check.get(props[k].get("type"), lambda v: True)(v) for k, v in args.items())
