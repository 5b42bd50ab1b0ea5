"""Bad requests, table-driven: each gets the documented status and OpenAI's error shape, never a 422 body,
a 500 or a stack trace."""

from __future__ import annotations

import json

import httpx
import pytest

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
MAX_MODEL_LEN = 128
BODY_LIMIT = 4096


def chat(**kw):
    return {"messages": MSG, **kw}


def comp(**kw):
    return {"prompt": "hi", **kw}


RESP = "/v1/responses"
FN = {"type": "function", "name": "f", "parameters": {"type": "object"}}


def resp(**kw):
    return {"input": "hi", **kw}


# (id, method, path, body: dict | bytes | None, status, param (None = don't care), code (None = don't care))
CASES = [
    ("not-json", "POST", CHAT, b"{", 400, None, None),
    ("json-list", "POST", CHAT, b"[1, 2]", 400, None, None),
    ("empty-body", "POST", CHAT, b"", 400, None, None),
    ("not-utf8", "POST", CHAT, b'{"messages": "\xff\xfe"}', 400, None, None),
    ("deep-nesting", "POST", CHAT, b"[" * 100_000 + b"]" * 100_000, 413, None, "request_too_large"),
    ("deep-nesting-small", "POST", CHAT, b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}", 400, None, None),
    ("nan", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None, None),
    ("infinity", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, None,
     None),
    ("huge-float", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', 400,
     "temperature", None),
    ("no-messages", "POST", CHAT, {"model": "x"}, 400, "messages", None),
    ("empty-messages", "POST", CHAT, {"messages": []}, 400, "messages", None),
    ("messages-not-list", "POST", CHAT, {"messages": "hi"}, 400, "messages", None),
    ("unknown-role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", None),
    ("missing-content", "POST", CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0", None),
    ("message-not-object", "POST", CHAT, {"messages": ["hi"]}, 400, "messages.0", None),
    ("image-part", "POST", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages.0", None),
    ("temperature-negative", "POST", CHAT, chat(temperature=-0.1), 400, "temperature", None),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400, "temperature", None),
    ("top-p-zero", "POST", CHAT, chat(top_p=0), 400, "top_p", None),
    ("top-p-above-one", "POST", CHAT, chat(top_p=1.5), 400, "top_p", None),
    ("top-k-below-minus-one", "POST", CHAT, chat(top_k=-2), 400, "top_k", None),
    ("min-p-above-one", "POST", CHAT, chat(min_p=1.5), 400, "min_p", None),
    ("n-zero", "POST", CHAT, chat(n=0), 400, "n", None),
    ("n-too-large", "POST", CHAT, chat(n=1000), 400, "n", None),
    ("n-bool", "POST", CHAT, chat(n=True), 400, "n", None),
    ("n-float", "POST", CHAT, chat(n=2.5), 400, "n", None),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", "POST", COMP, comp(max_tokens=-5), 400, "max_tokens", None),
    ("max-completion-tokens-zero", "POST", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("context-length-chat", "POST", CHAT, chat(max_tokens=MAX_MODEL_LEN), 400, "messages",
     "context_length_exceeded"),
    ("context-length-completion", "POST", COMP, comp(max_tokens=MAX_MODEL_LEN), 400, "prompt",
     "context_length_exceeded"),
    ("prompt-too-long", "POST", COMP, comp(prompt=[5] * MAX_MODEL_LEN, max_tokens=1), 400, "prompt",
     "context_length_exceeded"),
    ("presence-penalty-range", "POST", CHAT, chat(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency-penalty-range", "POST", CHAT, chat(frequency_penalty=-2.5), 400, "frequency_penalty", None),
    ("repetition-penalty-zero", "POST", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty", None),
    ("seed-too-large", "POST", CHAT, chat(seed=2**70), 400, "seed", None),
    ("stop-empty-string", "POST", CHAT, chat(stop=[""]), 400, "stop", None),
    ("stop-number", "POST", CHAT, chat(stop=5), 400, "stop", None),
    ("stop-token-out-of-vocab", "POST", CHAT, chat(stop_token_ids=[10**6]), 400, "stop_token_ids", None),
    ("top-logprobs-too-many", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), 400, None, None),
    ("completion-logprobs-too-many", "POST", COMP, comp(logprobs=21), 400, "logprobs", None),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400, None, None),
    ("logit-bias-range", "POST", CHAT, chat(logit_bias={"5": 101}), 400, None, None),
    ("logit-bias-key", "POST", CHAT, chat(logit_bias={"five": 1}), 400, None, None),
    ("logit-bias-vocab", "POST", CHAT, chat(logit_bias={"99999999": 1}), 400, "logit_bias", None),
    ("tool-choice-unknown-name", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                    tool_choice={"type": "function", "function": {"name": "g"}}),
     400, None, None),
    ("bad-json-schema", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}), 400, "response_format.json_schema.schema", "invalid_grammar"),
    # schemathesis (stop 35): a non-boolean strict was accepted, on both routes
    ("strict-not-bool", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {}, "strict": {}}}), 400, "response_format.json_schema.strict", None),
    ("name-not-string", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": {}, "schema": {}}}), 400, "response_format.json_schema.name", None),
    ("tool-strict-not-bool", "POST", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {}, "strict": {}}}]), 400, None, None),
    ("response-format-no-type", "POST", COMP, comp(response_format={}), 400, "response_format.type", None),
    ("completion-strict-not-bool", "POST", COMP, comp(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {}, "strict": "yes"}}), 400, "response_format.json_schema.strict", None),
    ("bad-regex", "POST", COMP, comp(structured_outputs={"regex": "([a-"}), 400, "structured_outputs.regex",
     "invalid_grammar"),
    ("bad-grammar", "POST", CHAT, chat(structured_outputs={"grammar": "root ::= missing"}), 400,
     "structured_outputs.grammar", "invalid_grammar"),
    ("empty-choice", "POST", CHAT, chat(structured_outputs={"choice": []}), 400, "structured_outputs.choice", None),
    ("json-object-not-bool", "POST", COMP, comp(structured_outputs={"json_object": -173}), 400,
     "structured_outputs.json_object", None),
    ("json-object-zero", "POST", COMP, comp(structured_outputs={"json_object": 0}), 400,
     "structured_outputs.json_object", None),
    ("regex-zero", "POST", CHAT, chat(structured_outputs={"regex": 0}), 400, "structured_outputs.regex", None),
    ("tool-choice-required", "POST", CHAT, chat(tool_choice="required"), 400, None, None),
    ("response-format-schema", "POST", CHAT, chat(response_format={"type": "json_schema"}), 400, None, None),
    ("template-kwargs-clash", "POST", CHAT, chat(chat_template_kwargs={"messages": []}), 400,
     "chat_template_kwargs", None),
    ("prompt-missing", "POST", COMP, {"max_tokens": 3}, 400, "prompt", None),
    ("prompt-empty-list", "POST", COMP, comp(prompt=[]), 400, "prompt", None),
    ("prompt-mixed", "POST", COMP, comp(prompt=["a", 5]), 400, "prompt", None),
    ("prompt-empty-token-list", "POST", COMP, comp(prompt=[[1, 2], []]), 400, "prompt", None),
    ("prompt-token-out-of-vocab", "POST", COMP, comp(prompt=[1, 2, 10**6]), 400, "prompt", None),
    ("prompt-token-negative", "POST", COMP, comp(prompt=[[1, -3]]), 400, "prompt", None),
    ("suffix", "POST", COMP, comp(suffix="x"), 400, None, None),
    ("best-of", "POST", COMP, comp(best_of=3), 400, None, None),
    ("unknown-model-chat", "POST", CHAT, chat(model="gpt-9"), 404, "model", "model_not_found"),
    ("unknown-model-completion", "POST", COMP, comp(model="gpt-9"), 404, "model", "model_not_found"),
    ("unknown-model-retrieve", "GET", "/v1/models/gpt-9", None, 404, "model", "model_not_found"),
    ("unknown-route", "GET", "/v1/engines", None, 404, None, "not_found"),
    ("unknown-route-post", "POST", "/v2/chat", chat(), 404, None, "not_found"),
    ("wrong-method-chat", "GET", CHAT, None, 405, None, "method_not_allowed"),
    ("wrong-method-models", "DELETE", "/v1/models", None, 405, None, "method_not_allowed"),
    ("body-too-large", "POST", CHAT, chat(pad="x" * (2 * BODY_LIMIT)), 413, None, "request_too_large"),
    ("resp-no-input", "POST", RESP, {"instructions": "x"}, 400, "input", None),
    ("resp-input-number", "POST", RESP, {"input": 5}, 400, "input", None),
    ("resp-input-empty", "POST", RESP, {"input": []}, 400, "input", None),
    ("resp-item-reference", "POST", RESP, {"input": [{"type": "item_reference", "id": "x"}]}, 400, "input", None),
    ("resp-image-part", "POST", RESP, {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x"}]}]}, 400, "input", None),
    ("resp-unknown-role", "POST", RESP, {"input": [{"role": "wizard", "content": "hi"}]}, 400, "input", None),
    ("resp-call-without-id", "POST", RESP, {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     400, "input", None),
    ("resp-web-search-tool", "POST", RESP, resp(tools=[{"type": "web_search"}]), 400, "tools", None),
    ("resp-file-search-tool", "POST", RESP, resp(tools=[{"type": "file_search", "vector_store_ids": ["v"]}]), 400,
     "tools", None),
    ("resp-computer-tool", "POST", RESP, resp(tools=[{"type": "computer_use_preview", "display_width": 8,
                                                      "display_height": 8, "environment": "linux"}]), 400, "tools",
     None),
    ("resp-tool-no-name", "POST", RESP, resp(tools=[{"type": "function"}]), 400, "tools", None),
    ("resp-tool-choice-unknown", "POST", RESP, resp(tools=[FN], tool_choice={"type": "function", "name": "g"}), 400,
     None, None),
    ("resp-tool-choice-builtin", "POST", RESP, resp(tools=[FN], tool_choice={"type": "web_search_preview"}), 400,
     None, None),
    ("resp-required-without-tools", "POST", RESP, resp(tool_choice="required"), 400, None, None),
    ("resp-max-output-tokens-zero", "POST", RESP, resp(max_output_tokens=0), 400, "max_output_tokens", None),
    ("resp-temperature-above-two", "POST", RESP, resp(temperature=2.5), 400, "temperature", None),
    ("resp-top-p-zero", "POST", RESP, resp(top_p=0), 400, "top_p", None),
    ("resp-format-unknown", "POST", RESP, resp(text={"format": {"type": "xml"}}), 400, "text", None),
    ("resp-format-no-schema", "POST", RESP, resp(text={"format": {"type": "json_schema", "name": "x"}}), 400, "text",
     None),
    ("resp-bad-json-schema", "POST", RESP, resp(text={"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "nonsense"}}}), 400, "text.format.schema", "invalid_grammar"),
    ("resp-effort-unknown", "POST", RESP, resp(reasoning={"effort": "maximal"}), 400, "reasoning", None),
    ("resp-background", "POST", RESP, resp(background=True), 400, "background", None),
    ("resp-metadata-too-many", "POST", RESP, resp(metadata={str(i): "v" for i in range(17)}), 400, "metadata", None),
    ("resp-metadata-not-string", "POST", RESP, resp(metadata={"k": 5}), 400, None, None),
    ("resp-previous-unknown", "POST", RESP, resp(previous_response_id="resp_nope"), 400, "previous_response_id",
     "previous_response_not_found"),
    ("resp-context-length", "POST", RESP, resp(max_output_tokens=MAX_MODEL_LEN), 400, "input",
     "context_length_exceeded"),
    ("resp-logit-bias-vocab", "POST", RESP, resp(logit_bias={"99999999": 1}), 400, "logit_bias", None),
    ("resp-unknown-model", "POST", RESP, resp(model="gpt-9"), 404, "model", "model_not_found"),
    ("resp-get-unknown", "GET", RESP + "/resp_nope", None, 404, "response_id", "not_found"),
    ("resp-delete-unknown", "DELETE", RESP + "/resp_nope", None, 404, "response_id", "not_found"),
    ("resp-wrong-method", "PUT", RESP, None, 405, None, "method_not_allowed"),
    ("tokenize-both", "POST", "/tokenize", {"prompt": "a", "messages": MSG}, 400, None, None),
    ("tokenize-neither", "POST", "/tokenize", {}, 400, None, None),
    ("detokenize-out-of-vocab", "POST", "/detokenize", {"tokens": [10**6]}, 400, "tokens", None),
    ("detokenize-not-ints", "POST", "/detokenize", {"tokens": ["a"]}, 400, "tokens.0", None),
]


@pytest.fixture(scope="module")
def server(thread_server):
    engine = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 8}
    with thread_server(engine=engine, max_request_body_bytes=BODY_LIMIT) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def test_table_is_big_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(client, case):
    _, method, path, body, status, param, code = case
    if isinstance(body, bytes):
        r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    assert set(data) == {"error"}, data
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert "Traceback" not in r.text and "File \"" not in r.text
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def test_context_length_message_matches_openai(client):
    r = client.post(CHAT, json=chat(max_tokens=MAX_MODEL_LEN))
    prompt_tokens = client.post("/tokenize", json={"messages": MSG}).json()["count"]
    assert r.json()["error"]["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
        f"{prompt_tokens + MAX_MODEL_LEN} tokens ({prompt_tokens} in the messages, {MAX_MODEL_LEN} in the "
        "completion). Please reduce the length of the messages or completion.")
    r = client.post(COMP, json=comp(prompt=[5, 6], max_tokens=MAX_MODEL_LEN))
    assert r.json()["error"]["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens, however you requested "
        f"{MAX_MODEL_LEN + 2} tokens (2 in your prompt; {MAX_MODEL_LEN} for the completion). Please reduce your "
        "prompt; or completion length.")


def test_responses_context_length_names_the_input(client):
    r = client.post(RESP, json=resp(max_output_tokens=MAX_MODEL_LEN))
    assert "in the input" in r.json()["error"]["message"] and "messages" not in r.json()["error"]["message"]


def test_method_not_allowed_lists_allowed(client):
    r = client.get(CHAT)
    assert r.status_code == 405 and "POST" in r.headers.get("allow", "")


def test_bad_requests_leave_no_trace(client, server):
    """No engine request, no admitted ticket and no 5xx after the whole table ran."""
    assert server.engine.num_unfinished() == 0 and server.ctx.queue.active == 0
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics and 'status="422"' not in metrics
    # and the server still answers normally
    ok = client.post(CHAT, json=chat(max_tokens=2))
    assert ok.status_code == 200, ok.text
    json.loads(ok.text)
