"""FP8 end to end at TP 1: a checkpoint written by `model.quantize`, and a float one with `--quantization fp8`,
served over HTTP, produce the greedy tokens of the reference generator on the dequantized model."""

from __future__ import annotations

import openai
import pytest

from model.generate import generate
from model.loader import load_model
from model.quantize import quantize_checkpoint
from tests.service_fixtures import ServerProcess, make_tiny_checkpoint

PROMPT = [5, 17, 42, 8, 99, 23, 61, 7, 30]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8serve")
    src = make_tiny_checkpoint(root / "tiny-glm")
    quantize_checkpoint(src, root / "tiny-glm-fp8")
    return src, root / "tiny-glm-fp8"


def served_tokens(base_url: str, model: str) -> list[int]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


@pytest.mark.parametrize("how", ["fp8-checkpoint", "quantize-at-load"])
def test_serves_fp8_greedy_like_the_reference(ckpts, how, tmp_path):
    src, quantized = ckpts
    want = generate(load_model(quantized), PROMPT, 16)
    args = ["--model", str(quantized)] if how == "fp8-checkpoint" else ["--model", str(src), "--quantization", "fp8"]
    with ServerProcess([*args, "--device", "cpu", "--max-model-len", "256", "--kv-cache-tokens", "2048"],
                       tmp_path / "server.log") as server:
        got = served_tokens(server.base_url, "tiny-glm-fp8" if how == "fp8-checkpoint" else "tiny-glm")
        log = server.log()
    assert got == want
    assert "fp8:" in log and "dequantized to float32 at load" in log  # the path that ran is logged
