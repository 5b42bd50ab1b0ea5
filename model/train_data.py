"""Training data: the corpus jsonl tokenized once into one long stream, cut into random windows.

Windows are drawn from a generator seeded by (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tokenizer import Tokenizer


class TokenStream:
    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    @classmethod
    def from_jsonl(cls, path: str | Path, tok: Tokenizer, cache: str | Path | None = None) -> TokenStream:
        cache = Path(cache) if cache else None
        if cache is not None and cache.exists():
            return cls(torch.load(cache))
        ids: list[int] = []
        with open(path) as f:
            for line in f:
                ids.extend(tok.encode(json.loads(line)["text"]))
        tokens = torch.tensor(ids, dtype=torch.int32)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(tokens, cache)
        return cls(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, batch: int, length: int, seed: int, step: int) -> torch.Tensor:
        """[batch, length] int64 windows at random offsets."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - length, (batch,), generator=g)
        return torch.stack([self.tokens[s : s + length] for s in starts.tolist()]).long()

    def sequential(self, batch: int, length: int) -> torch.Tensor:
        """The first batch*length tokens as [batch, length] (deterministic evaluation)."""
        n = min(batch, len(self.tokens) // length)
        return self.tokens[: n * length].view(n, length).long()
