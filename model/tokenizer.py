"""Tokenizer and chat template for a Hugging Face-format checkpoint directory.

Text <-> ids goes through the `tokenizers` library on `tokenizer.json`. The chat template is a Jinja
template from the checkpoint (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`), and a
checkpoint is untrusted input: templates render in jinja2's `ImmutableSandboxedEnvironment` and only ever
see plain JSON data, so a template cannot reach Python internals or files. Nothing from a checkpoint is
executed as Python. Rendering mirrors transformers (trim_blocks, lstrip_blocks, `raise_exception`,
`tojson`, `strftime_now`) so the same template gives the same string here and there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _RustTokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "Tokenizer"]

# GLM's reasoning and tool-call markup. In GLM-5's tokenizer these are special tokens, yet they are the structure
# of the answer (parsed into reasoning_content and tool_calls), so decoding keeps them even when it skips specials.
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                 "</arg_value>")


class ChatTemplateError(ValueError):
    """A chat template is missing, does not compile, or failed (or was refused) while rendering.

    A ValueError so the API maps it to HTTP 400: the request or the checkpoint is at fault, not the server.
    """


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON (as transformers renders it)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so templates cannot plant dunder attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types: rich objects carry methods the sandbox cannot vet."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models from the API layer
        return _plain(value.model_dump(exclude_none=True))
    return f"<{type(value).__name__}>"


def _content_to_text(content: Any, index: int) -> str:
    """OpenAI content (a string, None, or a list of parts) as one string; parts join with newlines (vLLM)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text") and \
                    isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(f"messages[{index}]: unsupported content part {kind!r} (text only)")
        return "\n".join(texts)
    raise ChatTemplateError(f"messages[{index}]: content must be a string or a list of parts")


def _normalise_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        out.append({**message, "content": _content_to_text(message.get("content"), i)})
    return out


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute raises at once instead of rendering as empty.

    jinja's default hands back an Undefined for `x.__class__`, which prints as "" and only fails when used
    further; a template that reaches for internals is hostile or broken either way, so say so.
    """

    # `'a' * 10**8` cannot escape, but it can take gigabytes: bound what `*` and `**` may build.
    intercepted_binops = frozenset(["*", "**"])
    MAX_BUILT = 1_000_000  # characters or items a repetition may produce; magnitude of a power

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > 64:
                raise jinja2.exceptions.SecurityError("the chat template raises to too large a power")
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int) and len(seq) * count > self.MAX_BUILT:
                    raise jinja2.exceptions.SecurityError("the chat template builds too large a value")
        return super().call_binop(context, operator, left, right)


class ChatTemplate:
    """A compiled, sandboxed chat template. `source` names where it came from, for error messages."""

    def __init__(self, template: str, source: str = "<chat template>") -> None:
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
        self.source = source
        self.text = template
        try:
            self._template = env.from_string(template)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{source}: chat template does not compile: {e}") from e

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = True,
               tools: list[Any] | None = None, **kwargs: Any) -> str:
        context = {k: _plain(v) for k, v in kwargs.items()}
        context.update(messages=_normalise_messages(messages), tools=_plain(tools),
                       add_generation_prompt=bool(add_generation_prompt))
        try:
            return self._template.render(**context)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.TemplateError as e:  # includes SecurityError from the sandbox
            raise ChatTemplateError(f"chat template error ({type(e).__name__}): {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
            raise ChatTemplateError(f"chat template failed ({type(e).__name__}): {e}") from e


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_content(tok: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or an AddedToken dict ({"content": ...})."""
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping) and isinstance(tok.get("content"), str):
        return tok["content"]
    return None


def _ids(value: Any, path: Path, field: str) -> set[int]:
    if value is None:
        return set()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{path}: {field} must be an int or a list of ints, got {value!r}")
    return set(values)


def _pick_template(raw: Any, path: Path) -> dict[str, str]:
    """`chat_template` as a string, or HF's list form [{"name": ..., "template": ...}]."""
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                     and isinstance(t.get("template"), str) for t in raw):
        return {t["name"]: t["template"] for t in raw}
    raise ValueError(f"{path}: chat_template must be a string or a list of {{name, template}} objects")


class Tokenizer:
    """Encode/decode and chat templating for one checkpoint directory."""

    def __init__(self, tokenizer: _RustTokenizer, templates: dict[str, ChatTemplate], eos_token_ids: set[int],
                 bos_token_id: int | None, special_tokens: dict[str, str], source: str = "") -> None:
        self._tok = tokenizer
        self._templates = templates
        self.eos_token_ids: set[int] = eos_token_ids
        self.bos_token_id: int | None = bos_token_id
        self._special_tokens = special_tokens  # bos_token/eos_token/... strings handed to templates, as HF does
        self._source = source
        added = tokenizer.get_added_tokens_decoder()
        self.special_token_ids: set[int] = {i for i, t in added.items() if t.special}
        self._kept_specials = {i: t.content for i, t in added.items() if t.special and t.content in MARKUP_TOKENS}

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None when it ships none (then it serves token ids only)."""
        return cls.from_dir(path) if (Path(path) / "tokenizer.json").is_file() else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: not found (a checkpoint needs a tokenizers-format tokenizer.json)")
        try:
            tok = _RustTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{tok_file}: cannot load tokenizer: {e}") from e

        cfg_file = root / "tokenizer_config.json"
        tok_cfg = _read_json(cfg_file) or {}
        templates: dict[str, ChatTemplate] = {}
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():  # transformers saves it here and prefers it over tokenizer_config
            templates["default"] = ChatTemplate(jinja_file.read_text(encoding="utf-8"), str(jinja_file))
        elif tok_cfg.get("chat_template") is not None:
            for name, text in _pick_template(tok_cfg["chat_template"], cfg_file).items():
                templates[name] = ChatTemplate(text, f"{cfg_file} (chat_template {name!r})")

        special = {k: c for k, v in tok_cfg.items()
                   if k.endswith("_token") and (c := _token_content(v)) is not None}

        eos: set[int] = set()
        bos: int | None = None
        for name in ("generation_config.json", "config.json"):
            data = _read_json(root / name) or {}
            eos |= _ids(data.get("eos_token_id"), root / name, "eos_token_id")
            if bos is None and isinstance(data.get("bos_token_id"), int):
                bos = data["bos_token_id"]
        if not eos and special.get("eos_token") is not None:  # a bare tokenizer dir: fall back to its eos token
            eid = tok.token_to_id(special["eos_token"])
            eos = {eid} if eid is not None else set()
        if special.get("bos_token") is not None:
            bos = tok.token_to_id(special["bos_token"])
        return cls(tok, templates, eos, bos, special, str(root))

    # -- text <-> ids --------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        kept = self._kept_specials
        if not skip_special_tokens or not kept or kept.keys().isdisjoint(ids):
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        parts, run = [], []
        for i in ids:  # decode the runs between markup tokens, skipping other specials; keep the markup
            if i in kept:
                parts += [self._tok.decode(run, skip_special_tokens=True), kept[i]]
                run = []
            else:
                run.append(i)
        parts.append(self._tok.decode(run, skip_special_tokens=True))
        return "".join(parts)

    def encoded_vocab(self) -> list[str]:
        """Each id's piece as the model stores it (byte-level pieces undecoded), indexed by id; "" for gaps."""
        vocab = [""] * self.vocab_size
        for piece, i in self._tok.get_vocab(with_added_tokens=True).items():
            if 0 <= i < len(vocab):
                vocab[i] = piece
        return vocab

    @property
    def vocab_kind(self) -> str:
        """How pieces map to bytes: "byte_level" (GPT-2 style), "byte_fallback" (<0xNN> pieces) or "raw"."""
        decoder = json.dumps(json.loads(self._tok.to_str()).get("decoder"))  # once per grammar compiler
        if '"ByteLevel"' in decoder:
            return "byte_level"
        if '"ByteFallback"' in decoder:
            return "byte_fallback"
        return "raw"

    def max_token_chars(self) -> int | None:
        """Most characters one token can stand for, when that is known: for a byte-level BPE without a normalizer
        every byte of a text lands in exactly one token, so a text of L characters has at least L / this tokens."""
        if self._tok.normalizer is not None or type(self._tok.decoder).__name__ != "ByteLevel":
            return None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return max(map(len, vocab)) if vocab else None

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)

    # -- chat ----------------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def chat_template_text(self) -> str:
        """The source of every chat template (the server reads which markup they write)."""
        return "\n".join(t.text for t in self._templates.values())

    def apply_chat_template(self, messages: Sequence[Any], add_generation_prompt: bool = True,
                            tools: list[Any] | None = None, **kwargs: Any) -> str:
        if not self._templates:
            raise ChatTemplateError(f"{self._source}: no chat template (neither chat_template.jinja nor "
                                    "chat_template in tokenizer_config.json); use the completions API")
        # HF's convention: a template named "tool_use" serves requests that carry tools
        template = self._templates.get("tool_use") if tools else None
        template = template or self._templates.get("default") or next(iter(self._templates.values()))
        context = {**self._special_tokens, **kwargs}
        return template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **context)
