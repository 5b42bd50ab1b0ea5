"""Train the embedded model's tokenizer: byte-level BPE with GLM-style special tokens and chat template.

    python -m model.build_tokenizer --corpus runs/data --out runs/tokenizer [--vocab-size 8192]

Reads `<corpus>/train.jsonl` (written by `model.corpus`) and writes a Hugging Face-format tokenizer directory:
`tokenizer.json`, `tokenizer_config.json` (with the chat template), `chat_template.jinja`,
`special_tokens_map.json`, and `generation_config.json` (the eos ids, as GLM lists them). transformers'
`AutoTokenizer` loads it (tests/test_tokenizer.py checks that). Training is deterministic: same corpus, same
files.

GLM conventions kept: every sequence starts `[gMASK]<sop>` (the chat template writes it; for plain text the
post-processor adds it when `add_special_tokens=True`), turns are `<|role|>\n{content}` with no separator, and
generation stops at `<|endoftext|>`, `<|user|>` or `<|observation|>` (the model hands the turn back).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer

# Special tokens take ids 0.. in this order (GLM's relative order; GLM puts them after the BPE vocabulary).
ENDOFTEXT, GMASK, SOP = "<|endoftext|>", "[gMASK]", "<sop>"
SYSTEM, USER, ASSISTANT, OBSERVATION = "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
ARG_KEY, END_ARG_KEY, ARG_VALUE, END_ARG_VALUE = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
# GLM-5's reasoning and tool-call tags: single tokens, so a parser can find them in the id stream.
TAG_TOKENS = [THINK, END_THINK, TOOL_CALL, END_TOOL_CALL, ARG_KEY, END_ARG_KEY, ARG_VALUE, END_ARG_VALUE,
              TOOL_RESPONSE, END_TOOL_RESPONSE]
SPECIAL_TOKENS = [ENDOFTEXT, GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION, *TAG_TOKENS]
EOS_TOKENS = [ENDOFTEXT, USER, OBSERVATION]
ROLE_TOKENS = [SYSTEM, USER, ASSISTANT, OBSERVATION]

# GLM-5's chat format (written here, not copied): role tokens with no newline after them; tools as one JSON
# object per line inside <tools></tools> in a leading system turn; an assistant turn is `<think>reasoning</think>`
# (reasoning kept only after the last user turn, as GLM-5 clears older thinking), its text, then its calls as
# `<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>` (strings raw, other values as
# JSON); tool results are `<tool_response>` blocks after one `<|observation|>`. The generation prompt opens
# `<think>`, or closes it at once (`<think></think>`) when `enable_thinking` is false.
GLM_CHAT_TEMPLATE = """\
{{- '[gMASK]<sop>' -}}
{%- if tools -%}
{{- '<|system|>\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
{%- for tool in tools -%}
{{- '\\n' + (tool if tool.function is defined else {'type': 'function', 'function': tool}) | tojson -}}
{%- endfor -%}
{{- '\\n</tools>\\n\\nFor each function call, output the function name and arguments within the following \\
XML format:\\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>\\
<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{{- '<|system|>' + message.content -}}
{%- elif message.role == 'user' -%}
{{- '<|user|>' + message.content -}}
{%- elif message.role == 'assistant' -%}
{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' -%}
{%- if loop.index0 > ns.last_user and reasoning -%}
{{- '<|assistant|><think>' + reasoning.strip() + '</think>' -}}
{%- else -%}
{{- '<|assistant|><think></think>' -}}
{%- endif -%}
{{- (message.content or '').strip() -}}
{%- for call in message.tool_calls or [] -%}
{%- set fn = call.function if call.function is defined else call -%}
{{- '<tool_call>' + fn.name -}}
{%- if fn.arguments is mapping -%}
{%- for key, value in fn.arguments.items() -%}
{{- '<arg_key>' + key + '</arg_key><arg_value>' + (value if value is string else value | tojson) + '</arg_value>' -}}
{%- endfor -%}
{%- elif fn.arguments is string and fn.arguments.strip() not in ['', '{}'] -%}
{{- raise_exception('tool call arguments must be an object (decode the JSON string first)') -}}
{%- endif -%}
{{- '</tool_call>' -}}
{%- endfor -%}
{%- elif message.role in ['tool', 'observation'] -%}
{%- if loop.first or messages[loop.index0 - 1].role not in ['tool', 'observation'] -%}
{{- '<|observation|>' -}}
{%- endif -%}
{{- '<tool_response>' + message.content + '</tool_response>' -}}
{%- else -%}
{{- raise_exception('unsupported role: ' + message.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|><think></think>' if enable_thinking is defined and not enable_thinking else '<|assistant|><think>' -}}
{%- endif -%}
"""

# GPT-4-like split (GLM-4's tokenizer uses the same shape): letters with one leading non-letter, numbers in
# groups of up to 3, punctuation runs, newlines with their leading whitespace, and indentation kept apart
# from the token after it, which suits code.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> RustTokenizer:
    """Byte-level BPE over `texts`; special tokens are cut out of the text first so no merges learn them."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        max_token_length=32,  # long runs of '#' or '=' are rare in real text; not worth vocabulary slots
    )
    tok.train_from_iterator((_SPECIAL_RE.sub("", t) for t in texts), trainer=trainer)
    ids = [(t, tok.token_to_id(t)) for t in (GMASK, SOP)]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{GMASK} {SOP} $A", pair=f"{GMASK} {SOP} $A $B:1", special_tokens=ids)
    return tok


def write_tokenizer_dir(tok: RustTokenizer, out: Path, chat_template: str = GLM_CHAT_TEMPLATE) -> None:
    """The Hugging Face file set for `tok`, with a chat template (GLM-5's by default) and eos ids."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    eos_ids = [tok.token_to_id(t) for t in EOS_TOKENS]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,  # GLM pads with <|endoftext|> too
        "additional_special_tokens": [GMASK, SOP, *ROLE_TOKENS, *TAG_TOKENS],
        "clean_up_tokenization_spaces": False,  # decoding must give back code exactly
        "padding_side": "left",
        "chat_template": chat_template,
    }
    special_map = {"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
                   "additional_special_tokens": [GMASK, SOP, *ROLE_TOKENS, *TAG_TOKENS]}
    gen = {"eos_token_id": eos_ids, "pad_token_id": tok.token_to_id(ENDOFTEXT)}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map),
                       ("generation_config.json", gen)):
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def read_texts(path: Path, kind: str | None = None) -> Iterator[str]:
    """Texts of a corpus jsonl file (see model.corpus), optionally only one kind ("code" or "chat")."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if kind is None or rec["kind"] == kind:
                yield rec["text"]


def measure(tok: RustTokenizer, texts: Iterable[str]) -> dict[str, float]:
    """Bytes per token on `texts` (special tokens removed) and whether every text decodes back exactly."""
    n_bytes = n_tokens = n_docs = bad = 0
    for text in texts:
        body = _SPECIAL_RE.sub("", text)
        ids = tok.encode(body, add_special_tokens=False).ids
        n_bytes += len(body.encode("utf-8"))
        n_tokens += len(ids)
        n_docs += 1
        bad += tok.decode(ids, skip_special_tokens=False) != body
    return {"docs": n_docs, "bytes": n_bytes, "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3), "roundtrip_failures": bad}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="directory written by `python -m model.corpus`")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--min-frequency", type=int, default=2)
    args = ap.parse_args(argv)
    train_file = args.corpus / "train.jsonl"
    if not train_file.is_file():
        ap.error(f"{train_file} not found; run `python -m model.corpus --out {args.corpus}` first")
    t0 = time.monotonic()
    tok = train_tokenizer(read_texts(train_file), args.vocab_size, args.min_frequency)
    write_tokenizer_dir(tok, args.out)
    stats = {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
             "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
             "eos_token_ids": [tok.token_to_id(t) for t in EOS_TOKENS],
             "train_seconds": round(time.monotonic() - t0, 1)}
    heldout = args.corpus / "heldout.jsonl"
    if heldout.is_file():
        stats["heldout_code"] = measure(tok, read_texts(heldout, "code"))
        stats["heldout_chat"] = measure(tok, read_texts(heldout, "chat"))
    json.dump(stats, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
