"""Benchmark the model on CPU: attention kernels, KV-cache generation, parameter counts.

python scripts/bench_model.py                     # everything
python scripts/bench_model.py --gen-tokens 200    # shorter generation run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import hydra.utils
import torch
from hydra import compose, initialize_config_dir

from llm.model import GPT, GPTConfig, MultiHeadAttention

CONF = Path(__file__).resolve().parents[1] / "conf"
SIZES = ["tiny", "cpu", "baby", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]


def model_config(size: str, vocab_size: int) -> GPTConfig:
    """The ``conf/model/<size>.yaml`` preset, composed as ``llm train model=<size>`` would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={size}"]).model
    return hydra.utils.instantiate(cfg, vocab_size=vocab_size)


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_attention(args: argparse.Namespace) -> None:
    print(f"\nattention forward+backward, B={args.batch} T={args.seq} C={args.embd} "
          f"heads={args.heads}, median of {args.reps}")  # fmt: skip
    print(f"{'impl':<8}{'ms':>10}")
    x = torch.randn(args.batch, args.seq, args.embd, requires_grad=True)
    results = {}
    for impl in ("manual", "sdpa"):
        torch.manual_seed(0)
        cfg = GPTConfig(n_embd=args.embd, n_head=args.heads, block_size=args.seq, attn_impl=impl)
        attn = MultiHeadAttention(cfg)

        def step(attn: MultiHeadAttention = attn) -> None:
            attn(x).sum().backward()

        results[impl] = median_time(step, args.reps)
        print(f"{impl:<8}{results[impl] * 1e3:>10.1f}")
    print(f"sdpa speedup: {results['manual'] / results['sdpa']:.2f}x")


def bench_generation(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = GPT(model_config("baby", 65)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    print(f"\ngeneration, baby config (vocab 65, {model.num_params() / 1e6:.2f}M params), "
          f"{args.gen_tokens} new tokens from a 1-token prompt")  # fmt: skip
    print(f"{'kv cache':<10}{'s':>8}{'tokens/s':>12}")
    rate = {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        model.generate(prompt, args.gen_tokens, seed=0, use_cache=use_cache)
        dt = time.perf_counter() - t0
        rate[use_cache] = args.gen_tokens / dt
        print(f"{'on' if use_cache else 'off':<10}{dt:>8.2f}{rate[use_cache]:>12.1f}")
    print(f"cache speedup: {rate[True] / rate[False]:.2f}x")


def param_counts(vocab_size: int) -> None:
    print(f"\nparameters (vocab {vocab_size}, tied weights counted once)")
    print(f"{'config':<13}{'layers':>7}{'heads':>6}{'embd':>6}{'block':>6}{'params':>14}{'M':>9}")
    for size in SIZES:
        c = model_config(size, vocab_size)
        with torch.device("meta"):  # shapes only: no memory, no init
            n = GPT(c).num_params()
        print(f"{size:<13}{c.n_layer:>7}{c.n_head:>6}{c.n_embd:>6}{c.block_size:>6}"
              f"{n:>14,}{n / 1e6:>8.1f}M")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--embd", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--gen-tokens", type=int, default=500)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip", nargs="*", default=[], choices=["attention", "generation", "params"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    if "attention" not in args.skip:
        bench_attention(args)
    if "generation" not in args.skip:
        bench_generation(args)
    if "params" not in args.skip:
        param_counts(args.vocab)


if __name__ == "__main__":
    main()
