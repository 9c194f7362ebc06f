"""Benchmark training throughput: the Lightning path against a plain PyTorch loop.

    python scripts/bench_train.py [--steps 200] [--warmup 10] [--repeat 3] [--full]
                                  [--only plain|lightning] [hydra overrides ...]

Both paths train the same GPT (experiment=shakespeare_char_cpu) on the same TextDataModule with
the same AdamW + warmup/cosine schedule and gradient clipping at 1.0. Each runs in its own
subprocess, so torch state is fresh and the peak RSS (ru_maxrss) is per path; the paths
alternate `--repeat` times and the run with the median time of each path is reported, since a
shared 2-core machine drifts by 10% from one minute to the next.
Tokens/s = steps * batch_size * block_size / time, counted after the first `--warmup` steps.

By default validation, checkpoints, loggers, sampling and the progress bar are off (pure
training). `--full` trains 2,000 steps of the recipe as is, evaluation included, and prints the
final val loss (nanoGPT: 1.886 at step 2,000 on this machine). The Lightning path is then a
default `llm train`: every callback of conf/callbacks/default.yaml that is on by default
(checkpoints, text samples, attention heat maps, step lines, ...) and TensorBoard; the plain
loop only computes the val loss. Both validate at the same steps on `trainer.limit_val_batches`
batches: at step 0 (Lightning's sanity check), every `trainer.val_check_interval` steps and at
the last step. The validations inside the timed steps (250..1750 of 2,000) are counted in
its time, with whatever their callbacks cost, then and later (work left to a background
thread slows the steps that follow); those at step 0 and at the last step are not, but are in
the fit's wall time. The table shows the validations of each path and their time in the timed
steps (Lightning: from a validation's start to the next training batch, checkpoints and the
callbacks' work on the training thread included).

Hydra overrides after the options change the recipe, e.g. the GPU run (Lightning path only: the
plain loop is the CPU reference), which also reports MFU where the GPU's peak FLOPs are known:

    python scripts/bench_train.py --only lightning --repeat 1 --steps 100 trainer=gpu \
        model=gpt2 tokenizer=gpt2 data.batch_size=16 compile=true
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
RESULT = "BENCH_RESULT "
# what the default (pure training) mode switches off
QUIET = [
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~logger",
    "callbacks.model_checkpoint=null",
    "callbacks.progress_bar=null",
    "callbacks.sample_text=null",
    "callbacks.attention=null",
    "callbacks.graceful_shutdown=null",
]


def compose_cfg(args: argparse.Namespace) -> Any:
    from hydra import compose, initialize_config_dir

    overrides = [
        "experiment=shakespeare_char_cpu",
        f"trainer.max_steps={args.steps}",
        f"output_dir={args.out}",
        f"paths.data_dir={ROOT / 'data'}",
        f"data.cache_dir={args.cache}",
        *args.overrides,
    ]
    if not args.full:
        overrides += QUIET
    # else the recipe as is: tensorboard into the temporary output_dir, every default callback
    # (no terminal in the child: the progress bar writes a line every 50 steps)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def summary(
    steps: int,
    warmup: int,
    tokens_per_step: int,
    t_warm: float,
    t_end: float,
    t_fit: float,
    validations: list[tuple[int, float]],
) -> dict[str, Any]:
    """``validations``: (step, seconds) of each, seconds NaN where it ran outside the timed
    steps (the one at step 0, the one at the last step)."""
    timed = steps - warmup
    inside = [sec for _, sec in validations if not math.isnan(sec)]
    return {
        "steps": steps,
        "timed_steps": timed,
        "timed_s": t_end - t_warm,
        "tokens_per_s": timed * tokens_per_step / (t_end - t_warm),
        "fit_wall_s": t_fit,
        "peak_rss_mb": peak_rss_mb(),
        "validation_steps": [step for step, _ in validations],
        "timed_validations": len(inside),
        "timed_validation_s": sum(inside),
    }


# -- Lightning ----------------------------------------------------------------------------
def run_lightning(args: argparse.Namespace) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from llm.cli.train import train

    cfg = compose_cfg(args)
    OmegaConf.set_struct(cfg, False)
    cfg.callbacks["bench_timer"] = {"_target_": f"{__name__}.StepTimer", "warmup": args.warmup}
    t0 = time.perf_counter()
    out = train(cfg)
    t_fit = time.perf_counter() - t0
    trainer = out["trainer"]
    timer = next(c for c in trainer.callbacks if type(c).__name__ == "StepTimer")
    tokens = int(cfg.data.batch_size) * int(cfg.model.block_size)
    res = summary(
        trainer.global_step,
        args.warmup,
        tokens,
        timer.t_warm,
        timer.t_end,
        t_fit,
        timer.validations,
    )
    res["last_train_loss"] = timer.last_loss
    res["callbacks"] = sorted(
        {type(c).__name__ for c in trainer.callbacks if not isinstance(c, StepTimer)}
    )
    val = trainer.callback_metrics.get("val/loss")
    res["final_val_loss"] = float(val) if val is not None else None
    res["mfu"] = mfu(out["module"], trainer, res["tokens_per_s"])
    res["device"] = device_name(out["module"].device)
    return res


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def mfu(module: Any, trainer: Any, tokens_per_s: float) -> float | None:
    """Model FLOPs utilization per device, where Lightning knows the device's peak FLOP/s."""
    from llm.training.throughput import peak_flops

    peak = peak_flops(module.device, trainer.precision)
    if not peak:
        return None
    return module.model.estimate_mfu(tokens_per_s / trainer.world_size, peak)


class StepTimer(Callback):
    """Wall clock after optimizer step `warmup` and after the last step, the last loss, and
    each validation's step and time: from its start to the next training batch (NaN where none
    follows, or before the timed steps)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = int(warmup)
        self.t_warm = math.nan
        self.t_end = math.nan
        self.last_loss = math.nan
        self.validations: list[tuple[int, float]] = []
        self._val_start: float | None = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validations.append((trainer.global_step, math.nan))
        if not trainer.sanity_checking and trainer.global_step >= self.warmup:
            self._val_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._val_start is not None:
            step, _ = self.validations[-1]
            self.validations[-1] = (step, time.perf_counter() - self._val_start)
            self._val_start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: time what has finished
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.t_warm = now
        self.t_end = now
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.last_loss = float(loss)


# -- plain PyTorch --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, limit: int) -> float:
    model.eval()
    losses = []
    for i, (x, y) in enumerate(loader):
        if i >= limit:
            break
        losses.append(model(x, y)[1].float())
    model.train()
    return float(torch.stack(losses).mean())


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    import hydra
    from omegaconf import OmegaConf

    from llm.model import GPT, GPTConfig
    from llm.training.optim import build_optimizer, build_scheduler

    cfg = compose_cfg(args)
    if cfg.trainer.accelerator != "cpu" or int(cfg.trainer.devices) != 1:
        raise SystemExit(
            "the plain loop is the single-process CPU reference; for other trainers run "
            "only the Lightning path: --only lightning"
        )
    t0 = time.perf_counter()
    random.seed(cfg.seed)  # what L.seed_everything does, without Lightning
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tokenizer = hydra.utils.instantiate(cfg.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_cfg, dict)
    model_cfg.pop("_target_", None)
    model_cfg["vocab_size"] = int(dm.vocab_size)
    model = GPT(GPTConfig(**model_cfg))
    model.train()

    o = cfg.optim
    opt = build_optimizer(model, o)
    sched = build_scheduler(opt, o, args.steps)
    clip = float(cfg.trainer.gradient_clip_val or 0.0)
    val_every = int(cfg.trainer.val_check_interval)
    val_batches = int(cfg.trainer.limit_val_batches or 0)
    val_loader = dm.val_dataloader() if val_batches else None

    loader = dm.train_dataloader()
    step, epoch = 0, 0
    t_warm = t_end = math.nan
    loss = torch.tensor(math.nan)
    val_loss = None
    validations: list[tuple[int, float]] = []  # (step, seconds in the timed steps or NaN)
    if val_loader is not None:  # step 0, as Lightning's sanity check (and nanoGPT) does
        val_loss = evaluate(model, val_loader, val_batches)
        validations.append((0, math.nan))
    while step < args.steps:
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            step += 1
            now = time.perf_counter()
            if step == args.warmup:
                t_warm = now
            t_end = now
            if val_loader is not None and (step % val_every == 0 or step >= args.steps):
                val_loss = evaluate(model, val_loader, val_batches)
                timed = args.warmup <= step < args.steps
                validations.append((step, time.perf_counter() - now if timed else math.nan))
            if step >= args.steps:
                break
        epoch += 1
    t_fit = time.perf_counter() - t0
    tokens = int(cfg.data.batch_size) * int(cfg.model.block_size)
    res = summary(step, args.warmup, tokens, t_warm, t_end, t_fit, validations)
    res["last_train_loss"] = float(loss)
    res["final_val_loss"] = val_loss
    return res


# -- driver ---------------------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Build the shared token cache, so neither timed fit pays for it."""
    import hydra

    cfg = compose_cfg(args)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=hydra.utils.instantiate(cfg.tokenizer))
    dm.prepare_data()
    return {}


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = {"prepare": prepare, "plain": run_plain, "lightning": run_lightning}[args.child]
    res = run(args)
    res["torch_threads"] = torch.get_num_threads()
    print(RESULT + json.dumps(res), flush=True)


def spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--out", args.out]
    cmd += ["--cache", args.cache, "--threads", str(args.threads)]
    cmd += ["--full"] if args.full else []
    cmd += ["--", *args.overrides]
    print(f"running {name} ...", flush=True)  # each in a fresh process: own ru_maxrss
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{name} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of tokens/s")
    parser.add_argument("--full", action="store_true", help="2,000 steps, evaluation on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the median counts")
    parser.add_argument("--only", choices=["plain", "lightning"], help="run one path only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe")
    children = ["prepare", "plain", "lightning"]
    parser.add_argument("--child", choices=children, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full and args.steps == 200:
        args.steps = 2000
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be in [0, --steps)")
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        args.cache = str(Path(tmp) / "cache")
        args.out = str(Path(tmp) / "prepare")
        spawn("prepare", args)
        names = [args.only] if args.only else ["plain", "lightning"]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for i in range(args.repeat):  # alternate, so a slow spell of the machine hits both
            for name in runs:
                args.out = str(Path(tmp) / f"{name}{i}")
                runs[name].append(spawn(name, args))
        # per path, the run with the median time (its own tokens/s, RSS and losses)
        results = {n: sorted(r, key=lambda x: x["timed_s"])[len(r) // 2] for n, r in runs.items()}
        for name, rs in runs.items():
            spread = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rs)
            print(f"{name}: tokens/s per run {spread}")

    mode = "full recipe, evaluation on" if args.full else "pure training, no val/ckpt/logger"
    first = next(iter(results.values()))
    print(
        f"\nshakespeare_char_cpu {' '.join(args.overrides)}".rstrip()
        + f", {args.steps} steps ({mode}); tokens/s over steps {args.warmup + 1}..{args.steps}; "
        f"threads={first['torch_threads']}"
    )
    print(
        f"{'path':<10} {'tokens/s':>10} {'timed s':>9} {'fit wall s':>11} {'peak RSS MB':>12} "
        f"{'train loss':>11} {'val loss':>9}"
    )
    for name, r in results.items():
        val = r["final_val_loss"]
        val_s = f"{val:.4f}" if val is not None else "-"
        print(
            f"{name:<10} {r['tokens_per_s']:>10,.0f} {r['timed_s']:>9.2f} {r['fit_wall_s']:>11.2f} "
            f"{r['peak_rss_mb']:>12.0f} {r['last_train_loss']:>11.4f} {val_s:>9}"
        )
    for name, r in results.items():
        steps = r["validation_steps"]
        if steps:
            print(
                f"{name} validations at steps {', '.join(map(str, steps))}; "
                f"{r['timed_validations']} in the timed steps, {r['timed_validation_s']:.2f} s"
            )
    if "callbacks" in results.get("lightning", {}):
        print(f"Lightning callbacks: {', '.join(results['lightning']['callbacks'])}")
    if "lightning" in results:
        lt = results["lightning"]
        shown = "- (peak FLOP/s unknown)"
        if lt.get("mfu") is not None:
            shown = f"{lt['mfu'] * 100:.1f}%"
        print(f"\nLightning on {lt['device']}: MFU {shown}")
    if len(results) == 2:
        p, lt = results["plain"], results["lightning"]
        overhead = (lt["timed_s"] / p["timed_s"] - 1) * 100
        print(f"Lightning overhead: {overhead:+.1f}% time per step (steady state, median runs)")
        print(f"fit wall (setup included): {(lt['fit_wall_s'] / p['fit_wall_s'] - 1) * 100:+.1f}%")
    print("peak RSS is ru_maxrss of each path's own subprocess")


if __name__ == "__main__":
    main()
