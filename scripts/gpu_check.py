"""The GPU path in one command: GPT-2 (124M) at block 1024, bf16, torch.compile, fused AdamW.

    python scripts/gpu_check.py [--steps 300] [--batch 16] [--nanogpt PATH] [overrides ...]

Checks, each printed as a row with its figures (about 5-8 minutes on one H100/H200):

1. adamw: `llm train model=gpt2 tokenizer=gpt2 trainer=gpu compile=true optim.fused=true` for
   `--steps` steps, with the training step run under `torch.cuda.set_sync_debug_mode("error")`
   (callback `NoSyncCheck`: any host sync in a non-logging step fails the run); tokens/s, MFU.
2. muon: the same with `optim=muon`.
3. ddp: the same with `trainer=ddp` when there is more than one GPU.
3b. fsdp: FSDP2 on 2 GPUs (`trainer=fsdp trainer.devices=2`, bf16 mixed precision, no compile):
   tokens/s and MFU, its distributed checkpoint (2 shard files) consolidated by `llm export`
   and sampled from. With `--device cpu`: the same on two CPU processes (`trainer=fsdp_cpu`).
4. generate: 256 tokens from the adamw checkpoint, KV cache against no cache (same greedy
   tokens), tokens/s.
5. board: the adamw run's TensorBoard events hold the custom-scalars layout with its MFU chart
   and `train/mfu` points (what TensorBoard shows on a GPU).
6. classify: `llm finetune task=classify` from the adamw checkpoint under `NoSyncCheck`, so
   every task's step (not only pretraining's) is held to no host sync.
   world 2->1, world 1->2 (more than one GPU, or `--world-change` on the CPU): a run of 2 GPUs
   checkpointed at half of `--steps` and resumed on 1 GPU accumulating 2 batches (the same
   global batch), and a 1-GPU run resumed on 2; each must end at the weights of the straight
   2-GPU run within `WORLD_TOLERANCE` (float32, dropout 0: only the reduction order differs).
7. nanoGPT (with `--nanogpt PATH`, a nanoGPT checkout): its bench.py at the same batch, block
   and dtype with compile, so both tokens/s come from the same run on the same GPU.

The data is tiny shakespeare with GPT-2's BPE (throughput does not depend on the text). Extra
Hydra overrides pass to every training run; `--device cpu` runs the plumbing on a CPU with a
small model (as the tests do): `python scripts/gpu_check.py --device cpu --steps 4 model=tiny`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUIET = [  # training only: no validation, no samples, no progress bar
    "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "callbacks.sample_text=null",
    "callbacks.attention=null",
]


def train(name: str, out: Path, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """One `llm train` run in its own process; its summary's tokens/s and MFU."""
    gpu = args.device == "cuda"
    overrides = [
        "model=gpt2",
        "tokenizer=gpt2",
        f"trainer={'gpu' if gpu else 'cpu'}",
        f"compile={str(gpu).lower()}",
        f"optim.fused={str(gpu).lower()}",
        f"data.batch_size={args.batch}",
        f"trainer.max_steps={args.steps}",
        "optim.warmup_steps=10",
        "+callbacks.no_sync._target_=llm.training.diagnostics.NoSyncCheck",
        f"hydra.run.dir={out / name}",
        f"paths.data_dir={args.data_dir}",
        *QUIET,
        *extra,
        *args.overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "llm", "train", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"check": name, "ok": False, "error": (proc.stderr or proc.stdout)[-2000:]}
    match = re.search(r"Throughput: +([\d,]+) tokens/s(?:, MFU ([\d.]+)%)?", proc.stdout)
    return {
        "check": name,
        "ok": match is not None,
        "tokens/s": float(match.group(1).replace(",", "")) if match else None,
        "mfu": float(match.group(2)) / 100 if match and match.group(2) else None,
        "seconds": seconds,
        "ckpt": out / name / "checkpoints" / "last.ckpt",
    }


def fsdp(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """FSDP2 on two processes (`trainer=fsdp` on 2 GPUs, bf16; `trainer=fsdp_cpu` on the CPU):
    its tokens/s, its distributed checkpoint (one shard file per rank), consolidated by
    `llm export` into the one file the other verbs read, which then samples."""
    gpu = args.device == "cuda"
    two = ["trainer=fsdp", "trainer.devices=2", "compile=false"] if gpu else ["trainer=fsdp_cpu"]
    row = train("fsdp", out, args, *two)
    if not row["ok"]:
        return row
    folder = row["ckpt"]
    shards = sorted(p.name for p in folder.glob("*.distcp")) if folder.is_dir() else []
    if len(shards) != 2:
        return {**row, "ok": False, "error": f"{folder}: {shards or 'no'} shard files, not 2"}
    single = out / "fsdp.ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "llm", "export", f"ckpt_path={folder}", f"out={single}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        return {**row, "ok": False, "error": (proc.stderr or proc.stdout)[-2000:]}
    sampled = generate(single, args.device, new_tokens=16)
    size = single.stat().st_size / 1e6
    note = f"2 shard files -> {single.name} ({size:.1f} MB); {sampled['note']}"
    return {**row, "ok": sampled["ok"], "note": note}


WORLD_TOLERANCE = 1e-4  # max |weight difference|; 1e-5 held on the CPU (tests/test_multinode.py)


def world_change(out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """A checkpoint resumed on another number of processes continues the same global order:
    2 -> 1 and 1 -> 2 processes against a straight 2-process run, global batch kept by
    accumulation, in float32 with no dropout so the weights compare."""
    import torch

    gpu = args.device == "cuda"
    two = ["trainer=ddp", "trainer.devices=2"] if gpu else ["trainer=ddp_cpu"]
    one = [f"trainer={'gpu' if gpu else 'cpu'}", "trainer.accumulate_grad_batches=2"]
    half = max(args.steps // 2, 1)
    common = [
        "trainer.precision=32-true",
        "model.dropout=0.0",
        "optim.warmup_steps=1",
        f"optim.decay_steps={2 * half}",  # the same schedule in both parts of a resumed run
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.save_top_k=-1",  # the half-way checkpoint kept
    ]
    steps = [f"trainer.max_steps={2 * half}"]
    every = [f"trainer.val_check_interval={half}"]  # in each world's batches
    every_one = [f"trainer.val_check_interval={2 * half}"]
    straight = train("world 2", out, args, *two, *common, *steps, *every)
    if not straight["ok"]:
        return [straight]
    mid = next((out / "world 2" / "checkpoints").glob(f"step{half:06d}-*.ckpt"))
    to_one = train("world 2->1", out, args, *one, *common, *steps, *every_one, f"ckpt_path={mid}")
    first = train("world 1", out, args, *one, *common, f"trainer.max_steps={half}", *every_one)
    rows = [to_one]
    if first["ok"]:
        rows.append(train("world 1->2", out, args, *two, *common, *steps, *every,
                          f"ckpt_path={first['ckpt']}"))  # fmt: skip
    else:
        rows.append(first)

    def weights(path: Path) -> dict[str, Any]:
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]

    reference = weights(straight["ckpt"])
    for row in rows:
        if not row["ok"]:
            continue
        resumed = weights(row["ckpt"])
        diff = max(float((resumed[k] - v).abs().max()) for k, v in reference.items())
        row["ok"] = diff <= WORLD_TOLERANCE
        row["note"] = f"max |weight - straight 2-process run's| {diff:.1e} (<= {WORLD_TOLERANCE})"
    return rows


def board(run: Path, gpu: bool) -> dict[str, Any]:
    """The run's layout has an MFU chart and train/mfu has points on a GPU whose peak is known
    (on a CPU: neither)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    if metadata.CONFIG_SUMMARY_TAG not in events.Tags()["tensors"]:
        return {"check": "board", "ok": False, "error": "no custom-scalars layout"}
    layout = layout_pb2.Layout()
    proto = events.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto
    layout.ParseFromString(proto.string_val[0])
    charts = [c.title for cat in layout.category for c in cat.chart]
    mfu = events.Scalars("train/mfu") if "train/mfu" in events.Tags()["scalars"] else []
    ok = ("MFU" in charts and len(mfu) > 0) if gpu else ("MFU" not in charts and not mfu)
    note = f"charts {', '.join(charts)}; train/mfu points {len(mfu)}"
    return {"check": "board", "ok": ok, "note": note}


def classify(ckpt: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A classifier finetune on the GPU with NoSyncCheck: its step never waits on the host."""
    rows = ["text\tlabel"] + [
        f"{'win money now' if i % 2 else 'see you at lunch'} {i}\t{'spam' if i % 2 else 'ham'}"
        for i in range(200)
    ]
    data = out / "classify.tsv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    overrides = [
        "task=classify",
        f"init={ckpt}",
        f"data.path={data}",
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.max_steps={min(args.steps, 60)}",
        "trainer.val_check_interval=30",
        "trainer.log_every_n_steps=10",
        "trainer.enable_progress_bar=false",
        "+callbacks.no_sync._target_=llm.training.diagnostics.NoSyncCheck",
        f"hydra.run.dir={out / 'classify'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "llm", "finetune", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        return {"check": "classify", "ok": False, "error": (proc.stderr or proc.stdout)[-2000:]}
    acc = re.search(r"val/acc: +([\d.]+)", proc.stdout)
    return {"check": "classify", "ok": True, "note": f"no host sync; val/acc {acc and acc[1]}"}


def generate(ckpt: Path, device: str, new_tokens: int = 256) -> dict[str, Any]:
    """Greedy tokens with and without the KV cache must agree; tokens/s of each."""
    import torch

    from llm.checkpoint import load_language_model

    lm = load_language_model(ckpt, device)
    idx = torch.tensor([lm.tokenizer.encode("ROMEO:")], device=device)
    n = min(new_tokens, lm.model.config.block_size - idx.size(1))
    rates, outputs = {}, {}
    for use_cache in (True, False):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs[use_cache] = lm.model.generate(idx, n, temperature=0.0, use_cache=use_cache)
        if device == "cuda":
            torch.cuda.synchronize()
        rates[use_cache] = n / (time.perf_counter() - start)
    same = torch.equal(outputs[True], outputs[False])
    return {
        "check": "generate",
        "ok": same,
        "tokens/s": rates[True],
        "note": f"no cache {rates[False]:,.0f} tokens/s; greedy tokens equal: {same}",
    }


def nanogpt(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """nanoGPT's bench.py at the same batch, block and dtype, compiled: its tokens/s."""
    proc = subprocess.run(
        [
            sys.executable,
            "bench.py",
            f"--batch_size={args.batch}",
            "--block_size=1024",
            "--dtype=bfloat16",
            "--compile=True",
            "--real_data=False",
        ],
        cwd=path,
        capture_output=True,
        text=True,
    )
    times = [float(m) for m in re.findall(r"time (\d+\.\d+)ms", proc.stdout)]
    if proc.returncode != 0 or not times:
        return {"check": "nanoGPT bench.py", "ok": False, "error": proc.stderr[-2000:]}
    ms = sorted(times)[len(times) // 2]
    return {"check": "nanoGPT bench.py", "ok": True, "tokens/s": args.batch * 1024 / ms * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout, to run its bench.py")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temp folder)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="paths.data_dir")
    parser.add_argument(
        "--world-change",
        action="store_true",
        help="on the CPU too: resume 2 processes on 1 and back (always with 2+ GPUs)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training run")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --device cpu to check the plumbing", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    rows = [train("adamw", out, args)]
    rows.append(train("muon", out, args, "optim=muon"))
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if gpus > 1:
        rows.append(train("ddp", out, args, "trainer=ddp"))
    if gpus > 1 or args.device == "cpu":  # on the CPU: two gloo processes
        rows.append(fsdp(out, args))
    if gpus > 1 or args.world_change:
        rows += world_change(out, args)
    if rows[0]["ok"]:
        rows.append(generate(rows[0]["ckpt"], args.device))
        rows.append(board(out / "adamw", gpu=args.device == "cuda"))
        rows.append(classify(rows[0]["ckpt"], out, args))
    if args.nanogpt is not None:
        rows.append(nanogpt(args.nanogpt, args))

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"\ngpu_check on {device} ({gpus} GPUs), {args.steps} steps of batch {args.batch}")
    print(f"{'check':<18} {'ok':<4} {'tokens/s':>12} {'MFU':>7}  note")
    for row in rows:
        tps = f"{row['tokens/s']:,.0f}" if row.get("tokens/s") else "-"
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "-"
        note = row.get("note") or row.get("error", "").strip().splitlines()[-1:] or [""]
        note = note if isinstance(note, str) else note[0]
        print(f"{row['check']:<18} {'yes' if row['ok'] else 'NO':<4} {tps:>12} {mfu:>7}  {note}")
    print(f"runs in {out}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
