"""Training data: the corpus jsonl tokenized once into one long stream, cut into windows at anchors.

A window starts at an anchor: the first token of every chat, tool or no-tool document (so a window sees a
conversation from its `[gMASK]<sop>` and its tool list, never a call whose tools were cut off), and every
`CODE_STRIDE` tokens inside a code file. The anchors thus also set the mixture: a long file counts once per
stride, a conversation once. Windows are drawn from a generator seeded by (seed, step), so a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tokenizer import Tokenizer

CODE_STRIDE = 256


class TokenStream:
    def __init__(self, tokens: torch.Tensor, anchors: torch.Tensor | None = None) -> None:
        self.tokens = tokens
        self.anchors = anchors if anchors is not None else torch.arange(len(tokens), dtype=torch.int64)

    @classmethod
    def from_jsonl(cls, path: str | Path, tok: Tokenizer, cache: str | Path | None = None) -> TokenStream:
        cache = Path(cache) if cache else None
        if cache is not None and cache.exists():
            saved = torch.load(cache)
            return cls(saved["tokens"], saved["anchors"])
        ids: list[int] = []
        anchors: list[int] = []
        with open(path) as f:
            for line in f:
                doc = json.loads(line)
                start = len(ids)
                ids.extend(tok.encode(doc["text"]))
                stride = CODE_STRIDE if doc.get("kind", "code") == "code" else len(ids) - start
                anchors.extend(range(start, len(ids), max(1, stride)))
        tokens = torch.tensor(ids, dtype=torch.int32)
        starts = torch.tensor(anchors, dtype=torch.int64)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"tokens": tokens, "anchors": starts}, cache)
        return cls(tokens, starts)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, batch: int, length: int, seed: int, step: int) -> torch.Tensor:
        """[batch, length] int64 windows at random anchors (clamped so a window never runs off the end)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        picks = torch.randint(0, len(self.anchors), (batch,), generator=g)
        starts = self.anchors[picks].clamp(max=len(self.tokens) - length)
        return torch.stack([self.tokens[s : s + length] for s in starts.tolist()]).long()

    def sequential(self, batch: int, length: int) -> torch.Tensor:
        """The first batch*length tokens as [batch, length] (deterministic evaluation)."""
        n = min(batch, len(self.tokens) // length)
        return self.tokens[: n * length].view(n, length).long()
