"""Time Muon's Newton-Schulz step in bfloat16 (what torch.optim.Muon always runs) and float32.

Why llm.training.optim.Muon runs it in float32 on CPU: CPUs without bfloat16 matrix units run
the bfloat16 matmuls many times slower.

python scripts/bench_muon.py                  # the shapes of model=llama_cpu and GPT-2 small
python scripts/bench_muon.py --threads 1 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

from llm.training.optim import newton_schulz

COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
# llama_cpu (n_embd 128: c_attn 256x128, c_fc 704x128, ...) and GPT-2 small (768: c_fc 3072x768)
SHAPES = [(128, 128), (256, 128), (704, 128), (128, 352), (768, 768), (3072, 768)]


def median_ms(fn: object, reps: int) -> float:
    fn()  # type: ignore[operator]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 5 Newton-Schulz steps")
    print(
        f"{'shape':>12} {'bf16 (torch) ms':>16} {'float32 ms':>11} {'ratio':>6} {'max |diff|':>10}"
    )
    for shape in SHAPES:
        g = torch.randn(shape)
        bf16 = median_ms(
            lambda g=g: _zeropower_via_newtonschulz(g, COEFFICIENTS, 5, EPS), args.reps
        )
        f32 = median_ms(
            lambda g=g: newton_schulz(g, COEFFICIENTS, 5, EPS, torch.float32), args.reps
        )
        diff = _zeropower_via_newtonschulz(g, COEFFICIENTS, 5, EPS).float()
        diff = (diff - newton_schulz(g, COEFFICIENTS, 5, EPS, torch.float32)).abs().max().item()
        print(f"{shape!s:>12} {bf16:>16.2f} {f32:>11.2f} {bf16 / f32:>5.1f}x {diff:>10.4f}")


if __name__ == "__main__":
    main()
