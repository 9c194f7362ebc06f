"""Benchmark the CPU speedrun against nanoGPT's CPU recipe, side by side (issue 13).

    python scripts/bench_speedrun.py [--seeds 1337,1,2] [--out DIR]
                                     [--recipes shakespeare_char_cpu,shakespeare_char_cpu_speedrun]
                                     [hydra overrides of the speedrun ...]

For each seed, in turn, it runs `llm train experiment=<recipe> seed=<seed>` for every recipe
(each in its own subprocess, interleaved so a slow spell of a shared machine hits both), then
`llm evaluate` on each run's last.ckpt (the weights after the final step) over the whole val split.

Per run it prints the wall time of the whole `llm train` command (interpreter start, imports,
data and checkpoints included: what a user waits for), the time inside `Trainer.fit`, steps,
tokens/s (tokens trained / fit time, validation included), the 20-batch val estimate the run
logged and the whole-split val loss; then the means, the wall-time ratio and whether the targets
are met: whole-split val loss <= 1.905 (nanoGPT's mean for its CPU recipe) on every seed, in at
most half the baseline's wall time.

Overrides after the options go to the speedrun recipe only (the baseline is the yardstick), e.g.
`trainer.max_steps=600`; `--recipes shakespeare_char_cpu_speedrun` runs the speedrun alone.
Runs go to --out (default: a temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "shakespeare_char_cpu"
SPEEDRUN = "shakespeare_char_cpu_speedrun"
TARGET_LOSS = 1.905  # nanoGPT's mean whole-split val loss for its 2,000-step CPU recipe
TARGET_RATIO = 0.5  # at most half the baseline's wall time
CLOCK = "fit_clock.json"


class FitClock(L.Callback):
    """Added to each timed run (`+callbacks.fit_clock`): the time inside fit and the tokens
    trained, written to `path` when fit ends. Costs nothing per step but a tensor size read."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.start = 0.0
        self.tokens = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.tokens += int(batch[0].numel())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val = trainer.callback_metrics.get("val/loss")
        record = {
            "fit_s": time.perf_counter() - self.start,
            "steps": int(trainer.global_step),
            "tokens": self.tokens,
            "val20": None if val is None else float(val),
            "threads": __import__("torch").get_num_threads(),
        }
        self.path.write_text(json.dumps(record), encoding="utf-8")


def llm(verb: str, args: list[str], log: Path) -> tuple[float, str]:
    """`python -m llm <verb> <args>` from the repository root; (wall seconds, its output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "scripts"), str(ROOT), env.get("PYTHONPATH")) if p
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "llm", verb, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout, encoding="utf-8")
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"llm {verb} failed (exit {proc.returncode}); log: {log}")
    return wall, proc.stdout


def run(recipe: str, seed: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    """Train one recipe for one seed, then evaluate its last.ckpt on the whole val split."""
    folder = out / f"{recipe}_seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    args = [
        f"experiment={recipe}",
        f"seed={seed}",
        f"hydra.run.dir={folder}",
        f"+callbacks.fit_clock._target_={__name__ if __name__ != '__main__' else 'bench_speedrun'}"
        ".FitClock",
        f"+callbacks.fit_clock.path={folder / CLOCK}",
        *overrides,
    ]
    load = os.getloadavg()[0]
    print(f"train {recipe} seed={seed} {' '.join(overrides)}".rstrip() + " ...", flush=True)
    wall, _ = llm("train", args, folder / "train_stdout.log")
    clock = json.loads((folder / CLOCK).read_text(encoding="utf-8"))
    ckpt = folder / "checkpoints" / "last.ckpt"
    _, text = llm("evaluate", [f"ckpt_path={ckpt}"], folder / "evaluate_stdout.log")
    found = re.search(r"^val_loss: ([0-9.]+)$", text, re.MULTILINE)
    if not found:
        raise SystemExit(f"no val_loss in the output of llm evaluate: {folder}")
    return {
        "recipe": recipe,
        "seed": seed,
        "wall_s": wall,
        "fit_s": clock["fit_s"],
        "steps": clock["steps"],
        "tokens_per_s": clock["tokens"] / clock["fit_s"],
        "val20": clock["val20"],
        "val_loss": float(found.group(1)),
        "threads": clock["threads"],
        "load": load,
    }


def table(results: list[dict[str, Any]], recipes: list[str]) -> str:
    """Every run, then each recipe's means."""
    head = (
        f"{'recipe':<30} {'seed':>5} {'wall s':>8} {'fit s':>8} {'steps':>6} {'tokens/s':>9} "
        f"{'val 20-batch':>12} {'val whole':>10} {'load':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        val20 = "-" if r["val20"] is None else f"{r['val20']:.4f}"
        lines.append(
            f"{r['recipe']:<30} {r['seed']:>5} {r['wall_s']:>8.1f} {r['fit_s']:>8.1f} "
            f"{r['steps']:>6} {r['tokens_per_s']:>9,.0f} {val20:>12} {r['val_loss']:>10.4f} "
            f"{r['load']:>5.1f}"
        )
    lines.append("-" * len(head))
    for recipe in recipes:
        rs = [r for r in results if r["recipe"] == recipe]
        mean = {k: statistics.fmean(r[k] for r in rs) for k in ("wall_s", "fit_s", "tokens_per_s")}
        loss = [r["val_loss"] for r in rs]
        sd = f" (sd {statistics.stdev(loss):.4f})" if len(loss) > 1 else ""
        lines.append(
            f"{recipe + ' mean':<30} {len(rs):>5} {mean['wall_s']:>8.1f} {mean['fit_s']:>8.1f} "
            f"{rs[0]['steps']:>6} {mean['tokens_per_s']:>9,.0f} {'':>12} "
            f"{statistics.fmean(loss):>10.4f}{sd}"
        )
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> str:
    """The wall-time ratio (means, and per seed) and whether both targets are met."""
    base = {r["seed"]: r for r in results if r["recipe"] == BASELINE}
    fast = {r["seed"]: r for r in results if r["recipe"] == SPEEDRUN}
    lines = []
    if fast:
        worst = max(r["val_loss"] for r in fast.values())
        ok = worst <= TARGET_LOSS
        lines.append(
            f"speedrun whole-split val loss: worst seed {worst:.4f}, mean "
            f"{statistics.fmean(r['val_loss'] for r in fast.values()):.4f} "
            f"(target <= {TARGET_LOSS} on every seed): {'met' if ok else 'NOT met'}"
        )
    if base and fast:
        seeds = sorted(set(base) & set(fast))
        ratio = statistics.fmean(fast[s]["wall_s"] for s in seeds) / statistics.fmean(
            base[s]["wall_s"] for s in seeds
        )
        fit = statistics.fmean(fast[s]["fit_s"] for s in seeds) / statistics.fmean(
            base[s]["fit_s"] for s in seeds
        )
        per_seed = ", ".join(f"{fast[s]['wall_s'] / base[s]['wall_s']:.3f}" for s in seeds)
        met = "met" if ratio <= TARGET_RATIO else "NOT met"
        lines.append(
            f"wall-time ratio speedrun / baseline: {ratio:.3f} (per seed: {per_seed}; fit only: "
            f"{fit:.3f}) (target <= {TARGET_RATIO}): {met}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1337,1,2", help="comma-separated (default 1337,1,2)")
    parser.add_argument("--out", help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument(
        "--recipes", default=f"{BASELINE},{SPEEDRUN}", help="comma-separated experiment names"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the speedrun recipe")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out).resolve() if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        # the token cache both recipes read (char tokenizer), built before any timed run
        llm("prepare", ["tokenizer=char", "data=tinyshakespeare"], out / "prepare.log")
        results = []
        for seed in seeds:
            for recipe in recipes:
                extra = args.overrides if recipe == SPEEDRUN else []
                results.append(run(recipe, seed, out, extra))
        (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        print(f"\n{table(results, recipes)}\n\n{verdict(results)}")
        print(
            f"cores: {os.cpu_count()}, torch threads: {results[0]['threads']}; load = 1-minute "
            "load average when the run started"
        )
        if args.overrides:
            print(f"speedrun overrides: {' '.join(args.overrides)}")
        if args.out:
            print(f"runs in {out}")


if __name__ == "__main__":
    main()
