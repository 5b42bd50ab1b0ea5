"""Per-request sampling parameters (OpenAI + vLLM extensions), validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_REPETITION_PENALTY = 20.0  # vLLM accepts any positive value; past ~2 the output is already degenerate


class SamplingParamError(ValueError):
    """A parameter out of its range; `param` names it (the API's error `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: off; k: sampled token's logprob plus k alternatives
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    # Not a sampling knob, but it travels with the request to the engine: prefix-cache entries are shared only
    # between requests with the same salt (vLLM's field; one salt per tenant keeps tenants apart).
    cache_salt: str | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: -100..100)
    allowed_token_ids: list[int] | None = None  # vLLM: sample only among these
    bad_words_token_ids: list[list[int]] | None = None  # vLLM's bad_words, tokenized by the caller
    # A grammar (an xgrammar structural tag, JSON) the output must follow: structured outputs and forced tool
    # calls. Compiled by the engine off its loop; the request waits for it before its first step.
    structured: str | None = None
    # A thinking budget (vLLM's thinking_token_budget, Anthropic's budget_tokens), for output that starts inside a
    # reasoning block: once this many tokens were generated without the block's end (these token ids, `</think>`),
    # the end is forced, token by token, and the answer follows.
    reasoning_budget: int | None = None
    reasoning_end_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, "n", "must be >= 1"),
            (self.temperature >= 0.0, "temperature", "must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be -1, 0 or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY, "repetition_penalty",
             f"must be in (0, {MAX_REPETITION_PENALTY:g}]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
             f"must be in [0, {MAX_LOGPROBS}]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
             f"must be in [0, {MAX_LOGPROBS}]"),
            (self.cache_salt is None or self.cache_salt != "", "cache_salt", "must be a non-empty string"),
        ]
        if self.logit_bias is not None:
            checks.append((all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()), "logit_bias",
                           "values must be in [-100, 100]"))
        checks.append((self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids",
                       "must not be empty"))
        checks.append((self.reasoning_budget is None or (self.reasoning_budget >= 0 and self.reasoning_end_token_ids),
                       "reasoning_budget", "must be >= 0, with the token ids that end the reasoning"))
        if not all(self.bad_words_token_ids or []):
            raise SamplingParamError("bad_words", "bad_words must not hold empty words")
        for ok, name, why in checks:
            if not ok:
                raise SamplingParamError(name, f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_logits_edits(self) -> bool:
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids) or \
            self.reasoning_budget is not None

    @property
    def argmax_only(self) -> bool:
        """Greedy with no penalties or edits: the token is the argmax of the raw logits (the engine's fast path)."""
        return self.greedy and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0 and \
            self.repetition_penalty == 1.0 and not self.has_logits_edits


def validate_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                     max_num_seqs: int, has_tokenizer: bool) -> None:
    """Raise ValueError for a request an engine with these fixed settings cannot serve."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_token_ids):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(prompt_token_ids) + params.max_tokens > max_model_len:
        raise ValueError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                         f"the maximum model length of {max_model_len} tokens")
    if params.n > max_num_seqs:
        raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({max_num_seqs})")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer; this checkpoint has none")
    if params.structured is not None and not has_tokenizer:
        raise ValueError("structured outputs need a tokenizer; this checkpoint has none")
    for name, ids in (("logit_bias", params.logit_bias or {}), ("allowed_token_ids", params.allowed_token_ids or []),
                      ("bad_words", [t for w in params.bad_words_token_ids or [] for t in w]),
                      ("reasoning_end_token_ids", params.reasoning_end_token_ids)):
        if any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"{name}: token ids must be in [0, {vocab_size})")
