"""What the engine hands back to the service, one object per step per request (vLLM's vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    # The `top_logprobs` alternatives at this position, best first: (token_id, logprob).
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One choice (of `n`). Fields are deltas since the previous RequestOutput of the same request."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool
    num_generated_tokens: int = 0  # cumulative over all choices (usage.completion_tokens)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, with the first output
    error: str | None = None  # set when an engine fault failed this request
    queue_time_s: float | None = None  # set on the first output: arrival -> first scheduled


@dataclass
class EngineStats:
    """A snapshot the service turns into Prometheus metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    dsa_tokens_read: int = 0  # latents the sparse attention read in decode
    dsa_tokens_cached: int = 0  # latents a dense attention would have read
