"""The post-training ladder on a CPU: pretrain -> instruct -> prefer (DPO) -> reinforce (GRPO).

A tiny char model learns two-digit addition, its answers written least-significant digit first
(``57+68=521``: the order a carry flows, so the model learns the algorithm instead of a table),
in four rungs, each an ``llm`` command run as a user would run it, and each scored on the same
held-out problems (never in any rung's data) by greedy exact match:

1. pretrain: ``llm train`` on lines ``a+b=c`` of the training problems;
2. instruct: ``llm finetune task=instruct task.template=null`` on records ``{instruction:
   "a+b=", output}`` (the prompt is the problem itself, in the context pretraining taught; the
   loss on the answer and the end-of-text after it) written by a sloppy annotator, who drops the
   carry out of the tens (``57+68=52``) in ``SLIP`` of the sums past 99, as human
   demonstrations hold mistakes;
3. prefer: ``llm finetune task=dpo`` from 2, on pairs (the right answer chosen, the answer
   with a carry slip rejected: see ``carry_slip``);
4. reinforce: ``llm rl reward=arithmetic`` from 2, on the generated problems' training share.

    python scripts/ladder.py                    # 3 seeds, docs/post_training.md's table
    python scripts/ladder.py --seeds 0 --out /tmp/ladder

Prints two tables (accuracy per rung and seed with the wall time per rung; the same split into
the sums past 99 and below 100) and writes them with a plot to ``--out``. A rung finished
before with the same command is not run again (rerun the ladder to complete a killed one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm.finetuning.arithmetic import Problem, problems  # noqa: E402

MAX_OPERAND = 99
OPS = "+"
REVERSE = True
SLIP = 0.6  # the share of sums past 99 whose demonstration drops the carry out of the tens
RUNGS = ("pretrain", "instruct", "dpo", "grpo")
# each rung's schedule (its other settings are in climb)
RECIPE = {
    "pretrain": [
        "optim.lr=3e-3",
        "optim.min_lr=3e-4",
        "trainer.max_steps=1500",
        "trainer.val_check_interval=500",
    ],
    "instruct": [
        "optim.lr=2e-3",
        "optim.min_lr=2e-4",
        "trainer.max_steps=5000",
        "trainer.val_check_interval=1000",
    ],
    "dpo": [
        "optim.lr=3e-4",
        "optim.min_lr=3e-4",
        "trainer.max_steps=300",
        "trainer.val_check_interval=150",
    ],
    "grpo": [
        "task.group_size=8",
        "data.batch_size=8",
        "optim.lr=1e-4",
        "optim.min_lr=1e-4",
        "trainer.max_steps=300",
        "trainer.val_check_interval=150",
    ],
}
MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=160"]


def carry_slip(p: Problem) -> str:
    """The answer with the carry into its most significant digit flipped, written as ``p``
    writes it: the mistake of a model learning to add (57+68: 25, the carry out dropped;
    40+43: 93). Least-significant digit first, chosen and rejected then differ in their last
    digit only, so DPO's gradient falls on the carry (a slip in an earlier digit leaves the
    right digits after it in the rejected answer, and DPO pushes those down too)."""
    assert p.op == "+", "the ladder's problems are additions"
    k = len(str(p.answer)) - 1
    carried = p.a % 10**k + p.b % 10**k >= 10**k
    return p.write(p.answer - 10**k if carried else p.answer + 10**k)


def sloppy(p: Problem, rng: random.Random) -> str:
    """A demonstration's answer: the carry out of the tens dropped in ``SLIP`` of the sums past
    99 (``57+68=52``, reversed), else right. The instruct rung imitates it: its greedy answer
    to such a sum slips while a right one is still sampled, what preferences and rewards fix."""
    return carry_slip(p) if p.answer >= 100 and rng.random() < SLIP else p.text


def write_data(folder: Path, train: list[Problem], seed: int) -> dict[str, Path]:
    """Every rung's data from the training problems only."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(20):  # 20 shuffled passes over the problems
        rng.shuffle(train)
        lines += [f"{p.prompt}{p.text}" for p in train]
    (folder / "pretrain.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    instruct = [{"instruction": p.prompt, "input": "", "output": sloppy(p, rng)} for p in train]
    pairs = [{"prompt": p.prompt, "chosen": p.text, "rejected": carry_slip(p)} for p in train]
    paths = {"pretrain": folder / "pretrain.txt"}
    for name, rows in (("instruct", instruct), ("dpo", pairs)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def llm(run: Path, verb: str, *args: str) -> float:
    """Run one ``llm`` command into ``run``; its wall time in seconds (an error stops the
    ladder). A rung that finished before (its ``seconds.json``) with the same command is not
    run again; one of another command (another recipe) stops the ladder."""
    done_file, command = run / "seconds.json", [verb, *args]
    if done_file.is_file() and (run / "checkpoints" / "last.ckpt").is_file():
        done = json.loads(done_file.read_text())
        if done.get("argv") != command:
            sys.exit(
                f"{run} holds a rung run by another command ({done.get('argv')}): remove "
                "it, or give the ladder another --out"
            )
        return float(done["seconds"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    argv = [sys.executable, "-m", "llm", *command, f"hydra.run.dir={run}"]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"llm {verb} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    done_file.write_text(json.dumps({"seconds": seconds, "argv": command}))
    return seconds


def solved(ckpt: Path, held_out: list[Problem]) -> list[bool]:
    """Greedy exact match on each held-out problem, its prompt rendered with the checkpoint's
    template (the plain text ``a+b=`` for a base model); prompts of one length are decoded
    together."""
    import torch

    from llm.checkpoint import load_language_model
    from llm.finetuning.rewards import arithmetic
    from llm.prompts import render

    lm = load_language_model(ckpt)
    tok, right = lm.tokenizer, {}
    by_length: dict[int, list[tuple[Problem, list[int]]]] = {}
    for p in held_out:
        ids = tok.encode(render(lm.template, [{"role": "user", "content": p.prompt}], tok))
        by_length.setdefault(len(ids), []).append((p, ids))
    for length, group in by_length.items():
        idx = torch.tensor([ids for _, ids in group])
        out = lm.model.generate(idx, 6, temperature=0.0, stop_token=tok.eot_id)
        for (p, _), row in zip(group, out[:, length:].tolist(), strict=True):
            new = row[: row.index(tok.eot_id)] if tok.eot_id in row else row
            right[p] = arithmetic(p.prompt, tok.decode(new), p.record()) == 1.0  # line one
    return [right[p] for p in held_out]


def score(ckpt: Path, held_out: list[Problem]) -> dict[str, float]:
    """Exact match on all held-out problems, and apart on the sums past 99 (where the
    annotator slips) and below 100 (where the demonstrations are right)."""
    right = solved(ckpt, held_out)

    def share(keep: list[bool]) -> float:
        return sum(r for r, k in zip(right, keep, strict=True) if k) / max(sum(keep), 1)

    past_99 = [p.answer >= 100 for p in held_out]
    return {
        "accuracy": sum(right) / len(right),
        "past_99": share(past_99),
        "below_100": share([not k for k in past_99]),
    }


def climb(seed: int, out: Path) -> dict[str, dict[str, float]]:
    """One seed's four rungs: {rung: {accuracy, past_99, below_100, seconds}}."""
    train, held_out = problems(MAX_OPERAND, OPS, held_out=0.1, seed=0, reverse=REVERSE)
    data = write_data(out / "data", list(train), seed)
    runs = {r: out / r for r in RUNGS}
    ckpt = {r: runs[r] / "checkpoints" / "last.ckpt" for r in RUNGS}
    common = [
        f"seed={seed}",
        "trainer.enable_progress_bar=false",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        "optim.warmup_steps=0",
    ]
    seconds = {
        "pretrain": llm(
            runs["pretrain"],
            "train",
            "data=text_files",
            f"data.path={data['pretrain']}",
            "tokenizer=char",
            *MODEL,
            "data.block_size=64",
            "data.batch_size=32",
            *RECIPE["pretrain"],
            f"paths.data_dir={out / 'cache'}",
            *common,
        ),
        "instruct": llm(
            runs["instruct"],
            "finetune",
            "task=instruct",
            "task.template=null",  # the problem as plain text (why: docs/post_training.md)
            f"init={ckpt['pretrain']}",
            f"data.path={data['instruct']}",
            "data.batch_size=32",
            *RECIPE["instruct"],
            "task.max_new_tokens=4",
            *common,
        ),
        "dpo": llm(
            runs["dpo"],
            "finetune",
            "task=dpo",
            f"init={ckpt['instruct']}",
            f"data.path={data['dpo']}",
            "data.batch_size=16",
            "task.beta=0.1",
            *RECIPE["dpo"],
            *common,
        ),
        "grpo": llm(
            runs["grpo"],
            "rl",
            f"init={ckpt['instruct']}",
            "reward=arithmetic",
            f"data.max_operand={MAX_OPERAND}",
            f"data.ops={OPS}",
            f"data.reverse={REVERSE}",
            "data.val_limit=64",
            "task.max_new_tokens=4",
            *RECIPE["grpo"],
            *common,
        ),
    }
    results = {r: {**score(ckpt[r], held_out), "seconds": seconds[r]} for r in RUNGS}
    import torch

    history = torch.load(ckpt["dpo"], map_location="cpu", weights_only=True)["val_history"]
    accs = [m["val/reward_acc"] for _, m in history]
    results["dpo"]["reward_acc_start"], results["dpo"]["reward_acc_end"] = accs[0], accs[-1]
    return results


def table(per_seed: dict[int, dict[str, dict[str, float]]]) -> str:
    seeds = sorted(per_seed)
    head = "| rung | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | wall time (mean) |"
    rows = [head, "|" + "---|" * (len(seeds) + 3)]
    for r in RUNGS:
        accs = [per_seed[s][r]["accuracy"] for s in seeds]
        secs = [per_seed[s][r]["seconds"] for s in seeds]
        cells = " | ".join(f"{a:.1%}" for a in accs)
        rows.append(
            f"| {r} | {cells} | {sum(accs) / len(accs):.1%} | {sum(secs) / len(secs):.0f} s |"
        )
    rows += ["", "| rung | " + " | ".join(f"seed {s}: past 99 / below 100" for s in seeds) + " |"]
    rows.append("|" + "---|" * (len(seeds) + 1))
    for r in RUNGS:
        cells = [per_seed[s][r] for s in seeds]
        rows.append(
            f"| {r} | "
            + " | ".join(f"{c['past_99']:.1%} / {c['below_100']:.1%}" for c in cells)
            + " |"
        )
    dpo = [per_seed[s]["dpo"] for s in seeds]
    rows.append("")
    rows.append(
        "DPO val reward accuracy, step 0 -> end: "
        + ", ".join(
            f"seed {s}: {d['reward_acc_start']:.2f} -> {d['reward_acc_end']:.2f}"
            for s, d in zip(seeds, dpo, strict=True)
        )
    )
    return "\n".join(rows)


def plot(per_seed: dict[int, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    seeds = sorted(per_seed)
    width = 0.8 / len(seeds)
    for k, seed in enumerate(seeds):  # bars, not lines: DPO and GRPO both start from instruct
        x = [i + (k - (len(seeds) - 1) / 2) * width for i in range(len(RUNGS))]
        accs = [100 * per_seed[seed][r]["accuracy"] for r in RUNGS]
        ax.bar(x, accs, width, label=f"seed {seed}")
    labels = {"dpo": "dpo\n(from instruct)", "grpo": "grpo\n(from instruct)"}
    ax.set_xticks(range(len(RUNGS)), [labels.get(r, r) for r in RUNGS])
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("the post-training ladder, tiny char model, CPU")
    ax.set_ylim(0, 115)  # room above 100% for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(ncol=len(seeds), loc="upper center", frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "ladder")
    args = parser.parse_args(argv)
    per_seed = {s: climb(s, args.out / f"seed{s}") for s in args.seeds}
    text = table(per_seed)
    print(text)
    (args.out / "ladder.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "ladder.json").write_text(json.dumps(per_seed, indent=1), encoding="utf-8")
    plot(per_seed, args.out / "ladder.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
