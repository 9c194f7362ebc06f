"""Throughput and latency of `llm serve` under concurrent clients: tokens/s over all clients,
and each request's latency (p50/p95) and time to its first token, at 1, 4, 16 clients.

    python scripts/bench_serve.py                      # a random model of nanoGPT's char size
    python scripts/bench_serve.py --ckpt last.ckpt --clients 1 4 8 16 --max-tokens 128

The server is the command users run (``llm serve ... port=0``), in its own process; the clients
are asyncio tasks streaming from /v1/completions, each sending its requests one after another.
Without ``--ckpt`` the model is a randomly initialised GPT of the shakespeare_char recipe's shape
(6 layers x 6 heads x 384, block 256, the char vocabulary): random weights end a reply at
end-of-text by chance, so the figures count the tokens each reply really had (``usage``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("shoot", ROOT / "scripts" / "screenshot_serve.py")
assert _spec and _spec.loader
shoot: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shoot)  # its `serve`: llm serve started, /health waited on, SIGTERM

SHAPE = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.0}
PROMPTS = ("ROMEO:\n", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed", "KING:")


def random_checkpoint(path: Path) -> Path:
    """A randomly initialised char-level GPT of SHAPE, saved as a llm checkpoint."""
    import torch

    from llm.checkpoint import save_checkpoint
    from llm.tokenizers import CharTokenizer
    from llm.training.module import GPTLitModule

    torch.manual_seed(0)
    tok = CharTokenizer()
    tok.fit(["".join(chr(c) for c in range(32, 127)) + "\n"])
    module = GPTLitModule(model={**SHAPE, "vocab_size": tok.vocab_size}, tokenizer=tok.to_dict())
    return save_checkpoint(module, path)


async def one_request(client: Any, url: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """Stream one completion: its latency, time to first token and token count."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    end = time.perf_counter() - start
    return {"latency": end, "first": first if first is not None else end, "tokens": tokens}


async def level(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """``clients`` concurrent clients, ``requests`` requests in all."""
    import httpx

    results: list[dict] = []
    todo = list(range(requests))

    async def client_loop(client: Any) -> None:
        while todo:
            i = todo.pop()
            prompt = PROMPTS[i % len(PROMPTS)]
            results.append(await one_request(client, url, prompt, max_tokens, seed=i))

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    latency = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "p50": statistics.median(latency),
        "p95": latency[min(len(latency) - 1, round(0.95 * (len(latency) - 1)))],
        "first_p50": statistics.median(r["first"] for r in results),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a checkpoint (default: a random one, SHAPE)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default: 2 per client, at least 8)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or random_checkpoint(Path(tmp) / "random.ckpt")
        what = str(args.ckpt) if args.ckpt else f"random char GPT {SHAPE}"
        print(f"model: {what}; max_tokens {args.max_tokens}; device {args.device}", flush=True)
        with shoot.serve(ckpt, f"device={args.device}") as url:
            asyncio.run(level(url, 1, 2, 8))  # warm-up: first-call costs out of the figures
            print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'tokens/s':>9} "
                  f"{'p50 s':>7} {'p95 s':>7} {'first-token p50 s':>18}")  # fmt: skip
            for clients in args.clients:
                requests = args.requests or max(8, 2 * clients)
                r = asyncio.run(level(url, clients, requests, args.max_tokens))
                print(f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} "
                      f"{r['tokens_per_s']:>9.1f} {r['p50']:>7.2f} {r['p95']:>7.2f} "
                      f"{r['first_p50']:>18.3f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
