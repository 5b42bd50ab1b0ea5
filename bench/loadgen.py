"""A small in-repo streaming load generator (httpx + SSE) with vLLM's metric definitions.

aiperf is the load generator of record for the peer comparison; this one is for what aiperf cannot do here:
send the very prompts (token ids) that an in-process engine run gets, so server and engine-direct tokens/s
compare like for like (the HTTP+SSE overhead), and run in CI without extra installs. Closed loop: C workers,
each sends its next request as soon as the previous one finished.

Definitions (vLLM `benchmarks/serve.py`): TTFT = request sent -> first streamed token chunk; ITL = gaps between
streamed chunks; TPOT = (e2e - TTFT) / (output tokens - 1) per request; output tokens from the usage chunk.

    python bench/loadgen.py --url http://127.0.0.1:8000 --concurrency 16 --requests 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
from common import percentile


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int] | str, max_tokens: int
                      ) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult()
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                now = time.perf_counter()
                if chunk.get("choices"):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
        res.e2e = time.perf_counter() - t0
        res.ok = res.ttft is not None
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(url: str, model: str, prompts: list[list[int]] | list[str], max_tokens: int, concurrency: int,
                   timeout: float = 600) -> dict:
    """Send every prompt once, `concurrency` at a time; returns `summarize`'s dict."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await one_request(client, url, model, prompt, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    return summarize(results, duration, concurrency)


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def ms(values: list[float | None], q: float) -> float | None:
        v = percentile([x for x in values if x is not None], q)
        return None if v is None else v * 1000

    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    return {
        "concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": duration, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / duration if duration else None,
        "requests_s": len(ok) / duration if duration else None,
        "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99),
        "tpot_ms_p50": ms(tpot, 50), "tpot_ms_p99": ms(tpot, 99),
        "itl_ms_p50": ms(itl, 50), "itl_ms_p99": ms(itl, 99),
        "e2el_ms_p50": ms(e2e, 50), "e2el_ms_p99": ms(e2e, 99),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn from [10, vocab)")
    args = ap.parse_args(argv)
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(10, args.vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    model = args.model or httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
    print(json.dumps(asyncio.run(run_load(args.url, model, prompts, args.max_tokens, args.concurrency)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
