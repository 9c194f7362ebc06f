"""Kill each long-running verb at random moments, resume it, compare with an uninterrupted run.

    python scripts/fault_check.py                      # every verb, the default K
    python scripts/fault_check.py --verbs prepare,train --kills 5 --seed 1

For each case an uninterrupted reference run is timed; then, K times, the same command is
started, sent SIGKILL or SIGTERM (alternately) after a seeded random share of the reference's
wall time, and resumed the way a user would: ``llm prepare`` and a ``-m`` sweep by running the
same command again, ``llm train`` / ``llm finetune`` with ``ckpt_path=<run>/checkpoints/last.ckpt``
(a run killed before its first checkpoint is started again in a new folder). The resumed result
must equal the reference: the shard bytes and token count of a cache; the weights, step and
final val loss of a run (1e-6 on the CPU); a sweep whole by ``llm.sweeps.check`` (``n_trials``
counted, each completed trial once in its report, none left running). The table
counts the kills, the resumed results identical to the reference, those with data lost (fewer
shards, tokens or steps, a missing last.ckpt) and those that left temp files.

Runs on the CPU in ``--workdir`` (default: a temp folder), offline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VERDICT = ROOT / "tests" / "data" / "the-verdict.txt"
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"#-\n()"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def llm(*args: str) -> list[str]:
    return [sys.executable, "-m", "llm", *args]


def run(cmd: list[str], timeout: float = 900) -> tuple[int, float, str]:
    """Run to the end: (exit code, seconds, output tail)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    return done.returncode, time.perf_counter() - t0, (done.stdout + done.stderr)[-3000:]


def run_killed(cmd: list[str], after: float, sig: signal.Signals) -> int:
    """Start ``cmd``, send ``sig`` to its main process after ``after`` s (a user's ``kill``),
    wait for it; its exit code (0 when it finished first)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def temp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


@dataclass
class Row:
    verb: str
    kills: int = 0
    identical: int = 0
    lost: int = 0
    temp_left: int = 0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the verbs


@dataclass
class Case:
    """One command, how to resume it and how to compare its result with the reference's."""

    verb: str
    command: Callable[[Path], list[str]]  # the folder the run writes to -> command
    # folder, command -> the resume command (None: the killed run had already finished)
    resume: Callable[[Path, list[str]], list[str] | None]
    result: Callable[[Path], Any]  # folder -> what must equal the reference
    lost: Callable[[Any, Any], bool]  # reference, result -> data lost?
    same: Callable[[Any, Any], bool] = lambda a, b: a == b


def cache_result(folder: Path) -> dict[str, Any]:
    meta_files = list((folder / "data" / "cache").glob("*/meta.json"))
    if len(meta_files) != 1:
        return {"shards": {}, "total": None}
    cache = meta_files[0].parent
    meta = json.loads(meta_files[0].read_text())
    shards = {p.name: p.read_bytes() for p in sorted(cache.glob("shard-*.bin"))}
    return {"shards": shards, "total": meta["total"]}


def prepare_case(name: str, data: list[str]) -> Case:
    def command(folder: Path) -> list[str]:
        return llm("prepare", *data, f"paths.data_dir={folder / 'data'}")

    def lost(ref: dict, got: dict) -> bool:
        return (
            got["total"] is None
            or got["total"] < ref["total"]
            or len(got["shards"]) < len(ref["shards"])
        )

    return Case(f"prepare ({name})", command, lambda f, c: c, cache_result, lost)


def run_result(folder: Path) -> dict[str, Any]:
    import torch

    last = folder / "run" / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return {"step": -1}
    raw = torch.load(last, map_location="cpu", weights_only=True)
    history = raw.get("val_history") or [[0, {}]]
    return {
        "step": raw["global_step"],
        "weights": raw["state_dict"],
        "val": history[-1][1].get("val/loss"),
        "validations": [s for s, _ in history],
    }


def same_run(a: dict, b: dict) -> bool:
    if a["step"] != b["step"] or a["validations"] != b["validations"]:
        return False
    if a["val"] is None or b["val"] is None or abs(a["val"] - b["val"]) > 1e-6:
        return False
    return all(float((a["weights"][k] - b["weights"][k]).abs().max()) <= 1e-6 for k in a["weights"])


def fit_case(verb: str, name: str, args: list[str]) -> Case:
    max_steps = int(next(a for a in args if a.startswith("trainer.max_steps=")).split("=")[1])

    def command(folder: Path) -> list[str]:
        return llm(
            verb, *args, f"paths.data_dir={folder / 'data'}", f"hydra.run.dir={folder / 'run'}"
        )

    def resume(folder: Path, cmd: list[str]) -> list[str] | None:
        last = folder / "run" / "checkpoints" / "last.ckpt"
        if last.is_file() and run_result(folder)["step"] == max_steps:
            return None  # killed after its last step: `llm` would say there is nothing to train
        if last.is_file():  # the documented resume: the same command, from the run's last.ckpt
            return [*(a for a in cmd if not a.startswith("hydra.run.dir=")), f"ckpt_path={last}"]
        shutil.rmtree(folder / "run", ignore_errors=True)  # no checkpoint yet: start again
        return cmd

    def lost(ref: dict, got: dict) -> bool:
        return got["step"] < ref["step"]

    return Case(f"{verb} ({name})", command, resume, run_result, lost, same_run)


def sweep_case(args: list[str], n_trials: int) -> Case:
    def command(folder: Path) -> list[str]:
        return llm("train", "-m", *args, f"hydra.sweep.dir={folder / 'sweep'}")

    def result(folder: Path) -> dict[str, Any]:
        sys.path.insert(0, str(ROOT))
        from llm.sweeps.check import check_sweep

        if not (folder / "sweep" / "optuna.db").is_file():
            return {"whole": False, "problems": ["no optuna.db"]}
        problems = check_sweep(folder / "sweep", n_trials)
        return {"whole": not problems, "problems": problems}

    return Case(
        "sweep (-m, Optuna)",
        command,
        lambda f, c: c,
        result,
        lambda ref, got: not got["whole"],
        lambda a, b: a["whole"] and b["whole"],
    )


def cases(work: Path) -> dict[str, list[Case]]:
    """The commands checked, small enough to run K times each on a laptop."""
    text = VERDICT.read_text(encoding="utf-8")
    big = work / "inputs" / "one_document.txt"
    docs = work / "inputs" / "docs"
    rows = work / "inputs" / "rows.jsonl"
    corpus = work / "inputs" / "corpus.txt"
    init = work / "inputs" / "init.ckpt"
    if not big.exists():
        docs.mkdir(parents=True)
        big.write_text(text * 200, encoding="utf-8")  # 4 MB: several tasks inside one document
        for i in range(60):
            (docs / f"{i:02d}.txt").write_text(text[i * 300 :] + text[: i * 300], encoding="utf-8")
        paragraphs = [p for p in text.split("\n\n") if p.strip()] * 20
        rows.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
        line = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
        corpus.write_text(line * 120, encoding="utf-8")
        make_init_checkpoint(init)
    small = ["data.shard_tokens=200000"]
    fit = [
        "data.batch_size=4",
        "data.stride=16",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
    ]
    tiny = ["model=tiny", "tokenizer=char", "data=text_files", f"data.path={corpus}"]
    ft = [f"init={init}", "block_size=32", "optim.lr=3e-3", "optim.min_lr=3e-3", "dropout=0.1"]
    steps = ["trainer.max_steps=30", "trainer.val_check_interval=10", "model.dropout=0.1"]
    ft_steps = ["trainer.max_steps=30", "trainer.val_check_interval=10"]
    instruct = [
        {"instruction": f"Repeat {w}", "input": "", "output": f"{w} {w}"}
        for w in ["cat", "dog", "sun", "sky", "red", "map", "cup", "pen", "hat", "box"]
    ] * 4
    instruct_path = work / "inputs" / "instruct.jsonl"
    instruct_path.write_text("".join(json.dumps(r) + "\n" for r in instruct))
    sweep = [
        "hparams_search=shakespeare_char_cpu_optuna",
        *tiny,
        *fit[1:],
        "data.batch_size=choice(4,8)",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "hydra.sweeper.n_trials=4",
    ]
    return {
        "prepare": [
            prepare_case(
                "one document, 1 worker",
                [
                    "data=text_files",
                    f"data.path={big}",
                    "tokenizer=gpt2",
                    *small,
                    "data.tokenize_workers=1",
                ],
            ),
            prepare_case(
                "60 documents, 2 workers",
                [
                    "data=text_files",
                    f"data.path={docs}",
                    "tokenizer=gpt2",
                    *small,
                    "data.tokenize_workers=2",
                ],
            ),
            prepare_case(
                "JSONL via hf_dataset, 2 workers",
                [
                    "data=hf_dataset",
                    f"data.path={rows}",
                    "tokenizer=gpt2",
                    "data.shard_tokens=20000",
                    "data.tokenize_workers=2",
                ],
            ),
        ],
        "train": [fit_case("train", "tiny, char", [*tiny, *fit, *steps])],
        "finetune": [
            fit_case(
                "finetune", "text", ["task=text", f"data.path={corpus}", *ft, *fit, *ft_steps]
            ),
            fit_case(
                "finetune",
                "instruct",
                [
                    "task=instruct",
                    f"data.path={instruct_path}",
                    *ft[:1],
                    "data.batch_size=4",
                    "optim.lr=3e-3",
                    "optim.min_lr=3e-3",
                    "dropout=0.1",
                    "task.max_new_tokens=8",  # the val responses written after training
                    *fit[2:],
                    *ft_steps,
                ],
            ),
            fit_case(
                "finetune",
                "text + LoRA",
                ["task=text", "lora=default", f"data.path={corpus}", *ft, *fit, *ft_steps],
            ),
        ],
        "sweep": [sweep_case(sweep, 4)],
    }


def make_init_checkpoint(path: Path) -> None:
    """A random char-level tiny GPT checkpoint to finetune (block 192 for instruct prompts)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from llm.checkpoint import save_checkpoint
    from llm.tokenizers import CharTokenizer
    from llm.training.module import GPTLitModule

    torch.manual_seed(0)
    tok = CharTokenizer()
    tok.fit([ALPHABET])
    model = {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0, "block_size": 192}
    save_checkpoint(
        GPTLitModule(model={**model, "vocab_size": tok.vocab_size}, tokenizer=tok.to_dict()), path
    )


# ----------------------------------------------------------------------------- the check


def check(case: Case, kills: int, rng: random.Random, work: Path) -> Row:
    row = Row(case.verb)
    ref_dir = work / "reference"
    shutil.rmtree(ref_dir, ignore_errors=True)
    code, seconds, out = run(case.command(ref_dir))
    if code != 0:
        raise SystemExit(f"{case.verb}: the reference run failed ({code}):\n{out}")
    reference = case.result(ref_dir)
    for i in range(kills):
        folder = work / f"kill{i}"
        shutil.rmtree(folder, ignore_errors=True)
        sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        after = rng.uniform(0.05, 1.0) * seconds
        cmd = case.command(folder)
        killed = run_killed(cmd, after, sig)
        while killed == 0 and after > 0.5:  # it finished first (a loaded machine is uneven)
            shutil.rmtree(folder, ignore_errors=True)
            after *= 0.6
            killed = run_killed(cmd, after, sig)
        again = case.resume(folder, cmd)
        code, _, out = run(again) if again is not None else (0, 0.0, "")
        result = case.result(folder)
        row.kills += 1
        ok = code == 0 and case.same(reference, result)
        row.identical += ok
        row.lost += case.lost(reference, result)
        left = temp_files(folder)
        row.temp_left += bool(left)
        if not ok or left:
            row.notes.append(
                f"{case.verb}: {sig.name} after {after:.1f}s (exit {killed}), resume exit {code}"
                f"{', temp files ' + ', '.join(left) if left else ''}\n{out[-800:] if code else ''}"
            )
        shutil.rmtree(folder, ignore_errors=True)
        print(f"  {case.verb}: kill {i + 1}/{kills} ({sig.name} at {after:.1f}s): "
              f"{'identical' if ok else 'DIFFERENT'}", flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbs", default="prepare,train,finetune,sweep")
    parser.add_argument("--kills", type=int, default=None, help="per verb (default: 12 for "
                        "prepare, 10 for train, 9 for finetune, 3 for the sweep)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    default_kills = {"prepare": 12, "train": 10, "finetune": 9, "sweep": 3}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fault_check_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    rows = []
    all_cases = cases(work)
    for verb in args.verbs.split(","):
        for case in all_cases[verb]:
            print(f"{case.verb}: reference run, then kills", flush=True)
            k = args.kills or default_kills[verb]
            k = max(1, round(k / len(all_cases[verb])))  # the verb's cases share its K
            rows.append(check(case, k, rng, work / verb))
    print()
    print(f"| {'verb':<32} | kills | resumed identical | data lost | temp files left |")
    print(f"|{'-' * 34}|-------|-------------------|-----------|-----------------|")
    for r in rows:
        print(
            f"| {r.verb:<32} | {r.kills:>5} | {r.identical:>17} | {r.lost:>9} | {r.temp_left:>15} |"
        )
    for r in rows:
        for note in r.notes:
            print(f"\n{note}")
    if any(r.identical < r.kills or r.lost or r.temp_left for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
