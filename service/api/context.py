"""What every route needs: the engine, settings, admission queue, metrics, and the prompt-side checks
(model name, context length, vocabulary, n) that turn a parsed request into engine input or a 4xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from model.tokenizer import Tokenizer
from service.api.errors import APIError, bad_request, redact
from service.engine.client import Engine
from service.metrics import ServiceMetrics
from service.queue import AdmissionQueue, AdmissionRejected, Ticket
from service.settings import Settings

log = logging.getLogger(__name__)

_SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_ASYNC_ENCODE_CHARS = 16_384  # longer texts tokenize in a thread so the event loop keeps streaming


def load_sampling_defaults(model_dir: Path) -> dict[str, Any]:
    """Default sampling values from the checkpoint's generation_config.json (vLLM does the same)."""
    path = model_dir / "generation_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", path)
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in _SAMPLING_DEFAULT_KEYS
            if isinstance(data.get(k), int | float) and not isinstance(data.get(k), bool)}


def _chars(content: Any) -> int:
    if isinstance(content, list):  # text parts
        return sum(len(p.get("text") or "") if isinstance(p, dict) else 0 for p in content)
    return len(content) if isinstance(content, str) else 0


class ServingContext:
    def __init__(self, engine: Engine, settings: Settings, model_dir: Path, model_name: str) -> None:
        self.engine = engine
        self.settings = settings
        self.model_dir = model_dir
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model_config.vocab_size
        self.max_n: int = engine.engine_config.max_num_seqs  # n sequences must fit one batch
        self.sampling_defaults = load_sampling_defaults(model_dir)
        self.queue = AdmissionQueue(settings.max_queue_size)
        self.metrics = ServiceMetrics(model_name, self.max_model_len, stats=engine.stats)
        self.inflight: set[str] = set()  # engine request ids, for aborting on a drain timeout
        self.max_token_chars = self.tokenizer.max_token_chars() if self.tokenizer is not None else None
        # Tokenizing costs ~100x the text's size in memory at its peak (the Rust Encoding holds a string, offsets
        # and masks per token): long texts take turns, so concurrent megabyte prompts cannot multiply that peak.
        self._long_encode = asyncio.Semaphore(1)
        self.ready = False
        self.created = int(time.time())
        from service.api.chat_agents import detect_parsers

        self.tool_parser_on, self.reasoning_parser_on = detect_parsers(settings, self.tokenizer)

    # -- admission ---------------------------------------------------------------------------------------------
    def admit(self) -> Ticket:
        """A ticket, or 503 + Retry-After (counted) when draining, dead, or the queue is full. Cheap and sync."""
        retry = {"Retry-After": str(self.settings.retry_after)}
        if not self.engine.is_alive:
            raise APIError(503, f"The engine has stopped ({redact(self.engine.dead_reason)}); this replica cannot "
                                "serve.",
                           code="engine_dead", headers=retry)
        if not self.ready:  # the app has not started its engine yet, or is shutting down
            raise APIError(503, "The server is not ready.", code="not_ready", headers=retry)
        try:
            return self.queue.admit()
        except AdmissionRejected as e:
            self.metrics.rejected(e.reason)
            raise APIError(503, e.message, code=e.reason, headers=retry) from None

    async def abort_all(self) -> None:
        for request_id in list(self.inflight):
            await self.engine.abort(request_id)

    # -- request checks ----------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            shown = name if len(name) <= 256 else name[:256] + "..."  # a 5 MB name is not echoed back whole
            raise APIError(404, f"The model `{shown}` does not exist.", param="model", code="model_not_found")

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n} (the server's --max-num-seqs), got {n}.", param="n")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise bad_request(f"Token id {t} is out of vocabulary (vocab_size {self.vocab_size}).", param=param)

    def need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise bad_request(f"This model has no tokenizer, so {what} is not available; send token ids.")
        return self.tokenizer

    async def encode(self, text: str, add_special_tokens: bool, prompt_of: str | None = None) -> list[int]:
        """Token ids of `text`. With `prompt_of` ("messages" or "prompt") a text that cannot fit the context is
        refused before it is tokenized (a multi-megabyte prompt for a small model costs nothing)."""
        tok = self.need_tokenizer("text input")
        if prompt_of is not None and self.max_token_chars and len(text) > self.max_model_len * self.max_token_chars:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                              f"{prompt_of} is {len(text)} characters long, which is more than "
                              f"{self.max_model_len} tokens. Please reduce the length of the {prompt_of}.",
                              param=prompt_of, code="context_length_exceeded")
        if len(text) > _ASYNC_ENCODE_CHARS:
            async with self._long_encode:
                return await asyncio.to_thread(tok.encode, text, add_special_tokens)
        return tok.encode(text, add_special_tokens)

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Any,
                          kwargs: dict[str, Any] | None) -> str:
        """The chat template's text; large conversations render in a thread so the event loop keeps streaming."""
        tok = self.need_tokenizer("the chat API")
        if not tok.has_chat_template:  # the tokenizer's own message names the checkpoint's path on disk
            raise bad_request("This model has no chat template, so the chat API is not available; use "
                              "/v1/completions.", code="no_chat_template")
        kwargs = dict(kwargs or {})
        clash = {"messages", "tools", "add_generation_prompt"} & kwargs.keys()
        if clash:
            raise bad_request(f"chat_template_kwargs may not set {sorted(clash)}.", param="chat_template_kwargs")

        def render() -> str:
            try:
                return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                               **kwargs)
            except ValueError as e:  # ChatTemplateError: a bad conversation (or template) is the client's 400
                raise bad_request(str(e), param="messages", code="invalid_messages") from None

        size = sum(_chars(m.get("content")) + 16 for m in messages)
        if size > _ASYNC_ENCODE_CHARS:
            return await asyncio.to_thread(render)
        return render()

    def resolve_max_tokens(self, prompt_len: int, requested: int | None, chat: bool) -> int:
        """max_tokens for the engine, or OpenAI's context-length 400 when prompt + completion do not fit."""
        limit, what = self.max_model_len, ("messages" if chat else "prompt")
        if prompt_len == 0:
            raise bad_request("The prompt is empty (it tokenized to no tokens).", param=what)
        if prompt_len >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your {what} "
                              f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
                              param=what, code="context_length_exceeded")
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            total = prompt_len + requested
            if chat:
                msg = (f"This model's maximum context length is {limit} tokens. However, you requested {total} "
                       f"tokens ({prompt_len} in the messages, {requested} in the completion). Please reduce the "
                       "length of the messages or completion.")
            else:
                msg = (f"This model's maximum context length is {limit} tokens, however you requested {total} "
                       f"tokens ({prompt_len} in your prompt; {requested} for the completion). Please reduce your "
                       "prompt; or completion length.")
            raise bad_request(msg, param=what, code="context_length_exceeded")
        return requested
