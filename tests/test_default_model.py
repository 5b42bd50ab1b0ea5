"""The shipped default model: a real Hugging Face checkpoint (transformers loads it and agrees with us), served
with no arguments, and it answers a request for Python with Python."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import httpx
import pytest
import torch

from model.batch import ForwardBatch
from model.generate import generate
from model.loader import load_model
from model.tokenizer import Tokenizer
from tests.model_fixtures import hf_model
from tests.service_fixtures import ServerProcess

WEIGHTS = Path(__file__).resolve().parents[1] / "model" / "weights"
DEFAULT = WEIGHTS / "glm-5-tiny-py"


def test_exactly_one_default_model_is_shipped():
    dirs = [d for d in WEIGHTS.iterdir() if (d / "config.json").is_file()]
    assert dirs == [DEFAULT]
    cfg = json.loads((DEFAULT / "config.json").read_text())
    assert cfg["architectures"] == ["GlmMoeDsaForCausalLM"] and cfg["num_nextn_predict_layers"] == 1
    assert cfg["index_topk"] < 256  # below the training length: DSA was really sparse
    size = sum(f.stat().st_size for f in DEFAULT.iterdir())
    assert size <= 60 * 2**20  # issue 19: one directory, <= 60 MB
    assert (DEFAULT / "MODEL_CARD.md").is_file()


def test_transformers_loads_it_and_agrees(tmp_path):
    tok = Tokenizer.from_dir(DEFAULT)
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "Return the sum of a list of numbers."}], add_generation_prompt=True))
    code = tok.encode("import os\n\ndef walk(top):\n    for name in os.listdir(top):\n        yield name\n" * 8)
    ours = load_model(DEFAULT, torch.float32)
    ref = hf_model(DEFAULT)
    for ids in (prompt, code[:300]):  # the second is past index_topk: sparse attention
        x = torch.tensor(ids)
        with torch.no_grad():
            want = ref(x[None]).logits[0]
        with torch.inference_mode():
            got = ours.logits(ours(x, ForwardBatch.single(len(x))))
        assert (got - want).abs().max().item() <= 1e-3
    with torch.no_grad():
        hf_tokens = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, prompt, 24) == hf_tokens


def python_in(text: str) -> str:
    m = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.S)
    return m.group(1) if m else text


@pytest.mark.server
def test_default_server_answers_with_python(tmp_path):
    with ServerProcess([], tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"}) as server:
        models = httpx.get(server.base_url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["glm-5-tiny-py"]
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
            "model": "glm-5-tiny-py", "temperature": 0, "max_tokens": 160,
            "messages": [{"role": "user", "content": "Write a function that returns the number of lines in a file."}],
        })
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    code = python_in(answer)
    assert "def " in code, answer
    # The code up to where generation stopped is Python: its complete top-level statements parse.
    lines = code.splitlines()
    parsed = False
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        parsed = any(isinstance(node, ast.FunctionDef) for node in tree.body)
        break
    assert parsed, answer


def speaks_glm5(model_dir: Path) -> bool:
    """Whether the checkpoint's tokenizer has GLM-5's tool and reasoning tags as single tokens."""
    tok = Tokenizer.from_dir(model_dir)
    return all(len(tok.encode(tag)) == 1 for tag in GLM5_TAGS)


GLM5_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
             "</arg_value>", "<tool_response>", "</tool_response>"]


def test_it_speaks_glm5_tokens_and_template():
    """Issue 19: the shipped tokenizer has GLM-5's tags as single tokens and ships GLM-5's chat template, which
    renders tools, calls and observations in GLM-5's format and opens `<think>` (or `<think></think>`)."""
    from model.build_tokenizer import GLM_CHAT_TEMPLATE
    from tests.test_tokenizer import TOOL_CONVERSATION, TOOLS

    assert speaks_glm5(DEFAULT)
    assert (DEFAULT / "chat_template.jinja").read_text() == GLM_CHAT_TEMPLATE
    tok = Tokenizer.from_dir(DEFAULT)
    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=False)
    assert "<tool_call>gcd<arg_key>a</arg_key><arg_value>12</arg_value><arg_key>b</arg_key>" in text
    assert "<|observation|><tool_response>6</tool_response><tool_response>HI</tool_response>" in text
    assert '"name": "gcd"' in text.split("<|user|>")[0]  # the tools are listed in the system turn
    ask = TOOL_CONVERSATION[:1]
    assert tok.apply_chat_template(ask, add_generation_prompt=True).endswith("<|assistant|><think>")
    assert tok.apply_chat_template(ask, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|assistant|><think></think>")
