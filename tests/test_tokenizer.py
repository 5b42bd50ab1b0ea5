"""Tokenizer and chat template: GLM-style rendering, sandboxing, and agreement with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.build_tokenizer import EOS_TOKENS, SPECIAL_TOKENS, TAG_TOKENS, main, train_tokenizer, write_tokenizer_dir
from model.tokenizer import ChatTemplate, ChatTemplateError, Tokenizer

SAMPLE = '''\
def greet(name: str) -> str:
    """Return a friendly greeting for *name*."""
    return f"Hello, {name}! Ça va? 日本語 ✓"


class Counter:
    def __init__(self, start=0):
        self.count = start

    def increment(self, step=1):
        self.count += step
        return self.count
'''
CODE_UNICODE = "def π(x):\n\treturn x * 3.14159  # ≈ π, naïve ✓ 🙂\r\n    s = '日本語'\n"
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write add."},
                {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]
EXPECTED = ("[gMASK]<sop><|system|>Be brief.<|user|>Write add.<|assistant|><think></think>"
            "def add(a, b):\n    return a + b")
TOOLS = [{"type": "function", "function": {"name": "gcd", "description": "Greatest Common Divisor.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
         {"type": "function", "function": {"name": "upper", "description": "Upper case.", "parameters": {
             "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "gcd of 12 and 18, and shout hi"},
    {"role": "assistant", "content": "", "reasoning_content": "Two calls.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "gcd", "arguments": {"a": 12, "b": 18}}},
        {"id": "c2", "type": "function", "function": {"name": "upper", "arguments": {"text": "hi"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "6"},
    {"role": "tool", "tool_call_id": "c2", "content": "HI"},
    {"role": "assistant", "content": "6 and HI.", "reasoning_content": "Both returned."}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_dir(train_tokenizer([SAMPLE] * 3 + [CODE_UNICODE], vocab_size=400), out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def copy_dir(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_glm_template_exact_strings(tok: Tokenizer) -> None:
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == EXPECTED
    prompt = tok.apply_chat_template(CONVERSATION[:2])
    assert prompt == "[gMASK]<sop><|system|>Be brief.<|user|>Write add.<|assistant|><think>"
    off = tok.apply_chat_template(CONVERSATION[:2], enable_thinking=False)
    assert off == "[gMASK]<sop><|system|>Be brief.<|user|>Write add.<|assistant|><think></think>"
    tool_turns = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    assert tok.apply_chat_template(tool_turns, add_generation_prompt=False) == \
        "[gMASK]<sop><|user|>hi<|observation|><tool_response>42</tool_response>"


def test_glm5_tool_calls_thinking_and_observations_exact(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=False)
    head, sep, rest = text.partition("<|user|>")
    assert head == (
        "[gMASK]<sop><|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + "\n".join(json.dumps(t) for t in TOOLS) + "\n</tools>\n\nFor each function call, output the function name "
        "and arguments within the following XML format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key>"
        "<arg_value>{arg-value-1}</arg_value><arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>..."
        "</tool_call>")
    # Reasoning is kept after the last user turn; calls are back to back; string values raw, others JSON;
    # consecutive tool results share one observation turn.
    assert sep + rest == (
        "<|user|>gcd of 12 and 18, and shout hi<|assistant|><think>Two calls.</think>"
        "<tool_call>gcd<arg_key>a</arg_key><arg_value>12</arg_value><arg_key>b</arg_key><arg_value>18</arg_value>"
        "</tool_call><tool_call>upper<arg_key>text</arg_key><arg_value>hi</arg_value></tool_call>"
        "<|observation|><tool_response>6</tool_response><tool_response>HI</tool_response>"
        "<|assistant|><think>Both returned.</think>6 and HI.")
    # An older turn's reasoning is cleared (GLM-5's default); a zero-argument call is the bare name.
    later = [*TOOL_CONVERSATION, {"role": "user", "content": "again"},
             {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": {}}}]}]
    text = tok.apply_chat_template(later, add_generation_prompt=False)
    assert "Two calls." not in text and "<|assistant|><think></think><tool_call>gcd" in text
    assert text.endswith("<|user|>again<|assistant|><think></think><tool_call>now</tool_call>")
    with pytest.raises(ChatTemplateError, match="arguments must be an object"):
        tok.apply_chat_template([{"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}])


def test_glm5_tags_are_single_special_tokens(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=False)
    ids = tok.encode(text)
    for tag in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>", "<tool_response>", "</tool_response>", "<|observation|>"):
        assert tok.token_to_id(tag) in ids and tok.decode([tok.token_to_id(tag)], skip_special_tokens=False) == tag
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_list_of_parts_content(tok: Tokenizer) -> None:
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]
    assert tok.apply_chat_template(parts, add_generation_prompt=False) == EXPECTED
    two = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(two).endswith("<|user|>a\nb<|assistant|><think>")
    with pytest.raises(ChatTemplateError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ChatTemplateError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ChatTemplateError, match="unsupported role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])


def test_tools_and_extra_kwargs_reach_the_template(tok: Tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = tok.apply_chat_template([{"role": "user", "content": "Weather?"}], tools=tools)
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools")
    assert '\n{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n</tools>' \
        in text and text.endswith("</tool_call><|user|>Weather?<|assistant|><think>")
    custom = ChatTemplate("{{ eos_token }}|{{ flavour }}|{{ tools | length }}|{{ add_generation_prompt }}")
    assert custom.render([], tools=tools, flavour="mint", eos_token="<e>") == "<e>|mint|1|True"


@pytest.mark.parametrize("template", [
    "{{ messages.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('MARKER', 'w') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages[0].content.format.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.system('touch MARKER') }}",
    "{{ messages.append(1) }}",
    "{{ range(10 ** 9) | list | length }}",
    "{{ raise_exception('nope') }}",
    "{% for x in %}",
])
def test_hostile_or_broken_templates_raise(template: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a template that did run would leave MARKER here
    with pytest.raises(ChatTemplateError):
        ChatTemplate(template).render([{"role": "user", "content": "x"}])
    assert not (tmp_path / "MARKER").exists()


def test_encode_decode_roundtrip_and_specials(tok: Tokenizer) -> None:
    for text in (SAMPLE, CODE_UNICODE, "", " ", "\n\n\t  x", "emoji 🙂👍🏽 and 中文"):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|user|>\nhi<|assistant|>\n")
    assert ids[0] == tok.token_to_id("<|user|>") and tok.token_to_id("<|assistant|>") in ids
    assert tok.decode(ids) == "\nhi\n"
    assert tok.decode(ids, skip_special_tokens=False) == "<|user|>\nhi<|assistant|>\n"
    assert tok.encode("x", add_special_tokens=True)[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    assert tok.special_token_ids == {tok.token_to_id(t) for t in SPECIAL_TOKENS} == set(range(17))
    assert tok.eos_token_ids == {tok.token_to_id(t) for t in EOS_TOKENS}
    assert 256 + 17 < tok.vocab_size <= 400  # bytes + specials + merges (a tiny text may run out of pairs)
    assert tok.id_to_token(1) == "[gMASK]" and tok.token_to_id("nope-not-a-token") is None


def test_agrees_with_transformers(tok: Tokenizer, tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    texts = [SAMPLE, CODE_UNICODE, EXPECTED, "  leading spaces\r\nand\ttabs ", "emoji 🙂👍🏽 中文 <|endoftext|>"]
    for text in texts:
        for add in (False, True):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add)
            assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
            # GLM's reasoning and tool-call tags survive skip_special_tokens here (the parsers read them); every
            # other special token goes, as in transformers.
            kept = [i for i in ids if i not in hf.all_special_ids or hf.convert_ids_to_tokens(i) in TAG_TOKENS]
            assert tok.decode(ids, skip_special_tokens=True) == hf.decode(kept, skip_special_tokens=False)
    for gen in (False, True):
        assert hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen) == \
            tok.apply_chat_template(CONVERSATION, add_generation_prompt=gen)
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    assert hf.apply_chat_template(CONVERSATION[1:2], tools=tools, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(CONVERSATION[1:2], tools=tools)
    for kwargs in ({}, {"enable_thinking": False}):
        for gen in (False, True):
            assert hf.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=gen,
                                          **kwargs) == \
                tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=gen, **kwargs)
    assert hf.eos_token_id == 0 and hf.pad_token_id == 0 and len(hf) == tok.vocab_size


def test_eos_ids_union_of_generation_config_and_config(tok_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(tok_dir, tmp_path / "ckpt")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 4]}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": 6, "bos_token_id": 1}))
    t = Tokenizer.from_dir(d)
    assert t.eos_token_ids == {0, 4, 6} and t.bos_token_id == 1
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    (d / "config.json").unlink()
    assert Tokenizer.from_dir(d).eos_token_ids == {5}
    (d / "generation_config.json").unlink()  # nothing left but tokenizer_config's eos_token
    assert Tokenizer.from_dir(d).eos_token_ids == {0}
    (d / "config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ValueError, match=r"config\.json.*eos_token_id"):
        Tokenizer.from_dir(d)


def test_template_sources(tok_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(tok_dir, tmp_path / "a", drop=("chat_template.jinja",))  # tokenizer_config's string form
    assert Tokenizer.from_dir(d).apply_chat_template(CONVERSATION, add_generation_prompt=False) == EXPECTED
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(d)
    assert t.apply_chat_template(CONVERSATION) == "plain"
    assert t.apply_chat_template(CONVERSATION, tools=[{"name": "f"}]) == "tools"
    (d / "chat_template.jinja").write_text("from the jinja file")  # transformers prefers the file
    assert Tokenizer.from_dir(d).apply_chat_template(CONVERSATION) == "from the jinja file"


def test_missing_and_bad_files_give_clear_errors(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    d = copy_dir(tok_dir, tmp_path / "b", drop=("chat_template.jinja", "tokenizer_config.json"))
    t = Tokenizer.from_dir(d)  # a base model without a template still tokenizes
    assert t.decode(t.encode(SAMPLE)) == SAMPLE and not t.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        t.apply_chat_template(CONVERSATION)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(d)


def test_training_is_deterministic_and_cli_writes_hf_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    texts = [SAMPLE, CODE_UNICODE] * 2
    assert train_tokenizer(texts, 350).to_str() == train_tokenizer(texts, 350).to_str()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [{"text": f"[gMASK]<sop>{SAMPLE}<|endoftext|>", "kind": "code", "source": "a.py"},
            {"text": f"[gMASK]<sop><|user|>\nx<|assistant|>\n{CODE_UNICODE}<|endoftext|>", "kind": "chat",
             "source": "a.py:f", "prompt_chars": 26}]
    for name in ("train.jsonl", "heldout.jsonl"):
        (corpus / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "350"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert 256 + 17 < stats["vocab_size"] <= 350 and stats["heldout_code"]["roundtrip_failures"] == 0
    assert stats["heldout_code"]["bytes_per_token"] > 1.5  # merges were learned, not bytes alone
    written = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert written == ["chat_template.jinja", "generation_config.json", "special_tokens_map.json",
                       "tokenizer.json", "tokenizer_config.json"]
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any("<|" in t for t in vocab if t not in SPECIAL_TOKENS)  # no merges learned from special tokens


@pytest.mark.parametrize("source", [
    "{% set x = 'a' * 10**8 %}{{ x|length }}",
    "{{ ('a' * 1000) * 100000 }}",
    "{{ [1, 2] * 10000000 }}",
    "{{ 2 ** 100000 }}",
])
def test_templates_cannot_exhaust_memory(source):
    from model.tokenizer import ChatTemplate, ChatTemplateError

    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
