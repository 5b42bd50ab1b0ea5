"""Reasoning and GLM-5 markup on a tiny checkpoint whose tokenizer has GLM-5's tags as single special tokens and
whose chat template (tests/data/glm5_chat_template.jinja, the GLM-5 format) opens `<think>`.

The server gets no parser flags: the template's tags switch both parsers on. The reference for "what was
generated" is /v1/completions on the same prompt ids with the same logit_bias (greedy): its raw text.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from model.tokenizer import ChatTemplate
from tests import engine_fixtures
from tests.service_fixtures import ServerProcess, sse_data

pytestmark = [pytest.mark.slow, pytest.mark.server]
TEMPLATE = (Path(__file__).parent / "data" / "glm5_chat_template.jinja").read_text()
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
        "</arg_value>", "<tool_response>", "</tool_response>", "[gMASK]", "<sop>", "<|system|>", "<|observation|>"]
ASK = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from tokenizers import AddedToken, Tokenizer

    out = tmp_path_factory.mktemp("ckpt") / "tiny-glm5"
    out.mkdir()
    engine_fixtures.make_checkpoint(out, mtp=False, tokenizer=False, vocab_size=400, max_position_embeddings=1024)
    engine_fixtures.build_tokenizer(out, 320)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TAGS])
    assert tok.get_vocab_size() <= 400
    tok.save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--model", str(checkpoint), "--max-model-len", "1024", "--kv-cache-tokens", "8192",
                        "--max-num-seqs", "8", "--device", "cpu"], log) as s:
        yield s


def _ids(server, *tags: str) -> dict[str, int]:
    r = httpx.post(server.base_url + "/tokenize", json={"prompt": "".join(tags), "add_special_tokens": False})
    ids = r.json()["tokens"]
    assert len(ids) == len(tags), ids  # each tag is one token
    return dict(zip(tags, ids, strict=True))


def _chat(server, stream: bool = False, **extra) -> dict:
    body = {"messages": ASK, "max_tokens": 32, "temperature": 0, **extra}
    if not stream:
        r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]
    r = httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120)
    assert r.status_code == 200, r.text
    joined = {"reasoning_content": "", "reasoning": "", "content": "", "finish_reason": None}
    for event in sse_data(r.text):
        if event == "[DONE]":
            continue
        for choice in json.loads(event)["choices"]:
            for key in ("reasoning_content", "reasoning", "content"):
                joined[key] += choice["delta"].get(key) or ""
            joined["finish_reason"] = choice["finish_reason"] or joined["finish_reason"]
    return joined


def _raw(server, bias: dict[str, int], **kwargs) -> str:
    prompt = httpx.post(server.base_url + "/tokenize", json={"messages": ASK, **kwargs}).json()["tokens"]
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": prompt, "max_tokens": 32, "temperature": 0,
                                                              "logit_bias": bias}, timeout=120)
    return r.json()["choices"][0]["text"]


def test_parsers_switch_on_from_the_template(server):
    log = server.log()
    assert "tool-call parser glm47 on" in log and "reasoning parser glm45 on" in log


def test_banned_think_end_makes_everything_reasoning(server):
    ids = _ids(server, "</think>", "<tool_call>")
    bias = {str(i): -100 for i in ids.values()}  # no way out of the reasoning block (a call would also end it)
    raw = _raw(server, bias)
    assert raw
    whole = _chat(server, logit_bias=bias)
    assert whole["message"]["reasoning_content"] == whole["message"]["reasoning"] == raw
    assert not whole["message"]["content"]
    streamed = _chat(server, stream=True, logit_bias=bias)
    assert streamed["reasoning_content"] == streamed["reasoning"] == raw and streamed["content"] == ""
    assert streamed["finish_reason"] == whole["finish_reason"]
    dropped = _chat(server, logit_bias=bias, include_reasoning=False)
    assert "reasoning_content" not in dropped["message"] and not dropped["message"]["content"]


def test_thinking_off_makes_everything_content(server):
    ids = _ids(server, "<think>", "<tool_call>")
    bias = {str(i): -100 for i in ids.values()}  # the model may not open a block (or a call) by itself
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    raw = _raw(server, bias, **kwargs)
    whole = _chat(server, logit_bias=bias, **kwargs)
    assert whole["message"]["content"] == raw and not whole["message"]["reasoning_content"]
    streamed = _chat(server, stream=True, logit_bias=bias, **kwargs)
    assert streamed["content"] == raw and streamed["reasoning_content"] == ""


def test_forced_call_with_special_token_tags(server):
    """The tags are special tokens here: the call still reaches the parser (decoded despite skip_special_tokens)."""
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"enum": ["hello", "world"]}}, "required": ["q"]}}}
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "messages": ASK, "tools": [tool], "tool_choice": "required", "max_tokens": 64, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup"
    assert json.loads(call["function"]["arguments"])["q"] in ("hello", "world")


def test_template_renders_tools_calls_results_and_reasoning():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "warm"},
    ]
    text = ChatTemplate(TEMPLATE).render(messages, add_generation_prompt=True, tools=tools)
    assert '<tools>\n{"name": "get_weather", "parameters": {"type": "object"}}\n</tools>' in text
    assert ("<|assistant|><think>Need the tool.</think><tool_call>get_weather<arg_key>city</arg_key>"
            "<arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>") in text
    assert text.endswith("<|observation|><tool_response>sunny</tool_response><tool_response>warm</tool_response>"
                         "<|assistant|><think>")
    cleared = ChatTemplate(TEMPLATE).render(messages + [{"role": "user", "content": "and Rome?"}], tools=tools,
                                            clear_thinking=True)
    assert "Need the tool." not in cleared
    off = ChatTemplate(TEMPLATE).render(messages[:1], enable_thinking=False)
    assert off.endswith("<|user|>Weather in Paris?<|assistant|></think>")
