"""Detokenizing and stop strings in the API process, off the engine's step (vLLM V1's output processor).

Behind `EngineClient` the engine runs with `EngineConfig.detokenize` off: its outputs carry token ids and no
text, and each request's stream turns them into text here, with the same `IncrementalDetokenizer` (and the same
rules) the in-process engine uses, so what a client sees does not change. A step of the engine then does no
tokenizer work (5.5-8.3 us per new token measured on a 2-core EPYC: 0.3 ms of a 16 ms step at 64 sequences;
bench/README.md, "Text made in the API process").

Stop strings can only be found here. When one ends a choice, its tokens after the stop are dropped, the choice is
reported finished ("stop", the string), and the engine is told to stop generating it (`finish_choice`). Until
that command lands the engine may run a step or two more for the choice; those tokens are discarded, and usage
counts only the tokens kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .detokenizer import IncrementalDetokenizer
from .outputs import RequestOutput
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer


def eos_token_ids(model_config: ModelConfig, tokenizer: Tokenizer | None) -> set[int]:
    """The token ids that end a sequence unless `ignore_eos`: the checkpoint's and its tokenizer's."""
    return set(model_config.eos_token_id) | set(getattr(tokenizer, "eos_token_ids", ()) or ())


class RequestDetokenizer:
    """One request's text: a detokenizer per choice, fed the engine's token-id deltas in order."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 eos: Iterable[int]) -> None:
        self.params = params
        # Tokens that end a choice in the engine; their text is shown only with include_stop_str_in_output.
        self._stop_tokens = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
        self._detoks = [IncrementalDetokenizer(tokenizer, prompt_token_ids, params) for _ in range(params.n)]
        self._kept = [0] * params.n
        self._ended = [False] * params.n

    def process(self, out: RequestOutput) -> list[int]:
        """Fill in `out`'s text in place, cut choices at stop strings, drop what came after one, and count usage.
        Returns the choices a stop string ended in this output while the engine was still generating them."""
        stop_now, kept = [], []
        for o in out.outputs:
            i = o.index
            if self._ended[i]:
                continue  # ended here earlier: tokens the engine made before it heard are dropped
            kept.append(o)
            detok, text, n, stop = self._detoks[i], [], 0, None
            for token in o.token_ids:
                n += 1
                if token not in self._stop_tokens or self.params.include_stop_str_in_output:
                    pushed = detok.push((token,))
                    text.append(pushed.text_delta)
                    if pushed.stop_string is not None:
                        stop = pushed.stop_string
                        break
            if stop is not None:
                del o.token_ids[n:]
                if o.logprobs is not None:
                    del o.logprobs[n:]
                if o.finish_reason is None:
                    stop_now.append(i)
                o.finish_reason, o.stop_reason = "stop", stop
            elif o.finish_reason in ("stop", "length"):  # as the engine would: held text is released at the end
                text.append(detok.flush())
            o.text = "".join(text)
            self._ended[i] = o.finish_reason is not None
            self._kept[i] += len(o.token_ids)
        out.outputs = kept
        out.num_generated_tokens = sum(self._kept)
        out.finished = out.finished or all(self._ended)
        return stop_now


__all__ = ["RequestDetokenizer", "eos_token_ids"]
