"""Killed at a named event (``LLM_FAULT``, :mod:`llm.faults`), then run again: the result is the
one an uninterrupted run gives. The fast part of ``scripts/fault_check.py``, which kills at
random moments instead."""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path

import pytest
from helpers import VERDICT, char_checkpoint, run_cli, tiny_overrides, write_corpus, write_jsonl

from llm import faults


def test_fault_spec_is_parsed_and_checked() -> None:
    assert faults.parse("train.step") == ("train.step", 1, signal.SIGKILL)
    assert faults.parse("prepare.write@7:sigterm") == ("prepare.write", 7, signal.SIGTERM)
    for bad in ("x@0", "x@two", "x:SIGNOPE", "@3"):
        with pytest.raises(ValueError, match="LLM_FAULT="):
            faults.parse(bad)


# ----------------------------------------------------------------------------- llm prepare


def _corpus(folder: Path, shape: str) -> Path:
    """One 2.6 MB document (tasks and pieces cut inside it) or 40 small ones."""
    text = VERDICT.read_text(encoding="utf-8")
    if shape == "one_document":
        path = folder / "one.txt"
        path.write_text(text * 128, encoding="utf-8")
        return path
    docs = folder / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(text[i * 400 :] + text[: i * 400], encoding="utf-8")
    return docs


def _prepare(corpus: Path, data_dir: Path, workers: int, fault: str | None = None) -> int:
    """``llm prepare`` of ``corpus`` into ``data_dir``; its exit code (a signal's: negative)."""
    args = [
        "data=text_files",
        f"data.path={corpus}",
        "tokenizer=char",
        "data.shard_tokens=100000",
        f"data.tokenize_workers={workers}",
        f"paths.data_dir={data_dir}",
    ]
    done = run_cli("prepare", *args, **({faults.ENV: fault} if fault else {}))
    if fault is None:
        assert done.returncode == 0, done.stderr
    if done.returncode == 143:  # SIGTERM: a clean stop that says once how to go on
        assert done.stderr.count("run the same command again to resume") == 1, done.stderr
    return done.returncode


def _cache(data_dir: Path) -> tuple[Path, dict[str, bytes], dict]:
    (folder,) = (data_dir / "cache").iterdir()
    shards = {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.bin"))}
    return folder, shards, json.loads((folder / "meta.json").read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "workers", "fault", "code"),
    [  # the first fails without the resume point's fix: the document was read again from 0
        ("one_document", 1, "prepare.shard_recorded@23", -signal.SIGKILL),
        ("many_documents", 2, "prepare.shard_renamed@2", -signal.SIGKILL),
        ("one_document", 2, "prepare.write@20:SIGTERM", 143),
    ],
)
def test_killed_prepare_rerun_equals_an_uninterrupted_build(
    tmp_path: Path, shape: str, workers: int, fault: str, code: int
) -> None:
    corpus = _corpus(tmp_path, shape)
    _prepare(corpus, tmp_path / "straight", workers)
    assert _prepare(corpus, tmp_path / "killed", workers, fault) == code
    (killed,) = (tmp_path / "killed" / "cache").iterdir()
    assert not (killed / "meta.json").exists()  # never a valid cache after a kill
    _prepare(corpus, tmp_path / "killed", workers)

    _, straight, meta = _cache(tmp_path / "straight")
    folder, resumed, resumed_meta = _cache(tmp_path / "killed")
    assert len(straight) > 3 and resumed == straight  # byte-identical shards, none extra
    assert resumed_meta["total"] == meta["total"] == sum(len(b) for b in straight.values()) // 2
    assert resumed_meta["text_bytes"] == meta["text_bytes"] == corpus_bytes(corpus)
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def corpus_bytes(path: Path) -> int:
    files = [path] if path.is_file() else sorted(path.iterdir())
    return sum(f.stat().st_size for f in files)


# ----------------------------------------------------------------------------- llm train

_STEPS = 12


def _train_args(tmp_path: Path, run: Path, *extra: str, corpus: Path | None = None) -> list[str]:
    if corpus is None:
        corpus = tmp_path / "corpus.txt"
        if not corpus.is_file():
            write_corpus(tmp_path)
    return [
        *tiny_overrides(tmp_path, corpus),
        "data.stride=16",
        "model.dropout=0.1",  # masks from the global RNG: the checkpoint must carry its state
        f"trainer.max_steps={_STEPS}",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"hydra.run.dir={run}",
        *extra,
    ]


def _curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars as TensorBoard shows them (a resumed writer's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if not t.startswith(("hp/", "whole_run/"))]
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}


def _state(run: Path) -> dict:
    import torch

    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("straight")
    done = run_cli("train", *_train_args(tmp, tmp / "run"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "fit.step@6",  # SIGKILL between validations: back to step 4's last.ckpt
        "checkpoint.write@3",  # SIGKILL inside the save after step 8's validation
        "fit.validation@5",  # SIGKILL during the validation at step 8 (sanity check: 2 batches)
        "fit.step@6:SIGTERM",  # a clean stop: last.ckpt is step 7's state (one batch more)
    ],
)
def test_killed_train_resumed_from_last_ckpt_equals_an_uninterrupted_run(
    straight_run: tuple[Path, Path], tmp_path: Path, fault: str
) -> None:
    import torch

    _, straight = straight_run
    run = tmp_path / "run"
    killed = run_cli("train", *_train_args(tmp_path, run), **{faults.ENV: fault})
    assert killed.returncode == (143 if fault.endswith("SIGTERM") else -signal.SIGKILL)
    stopped_at = _state(run)["global_step"]
    assert 0 < stopped_at < _STEPS
    if fault.endswith("SIGTERM"):  # the command it printed, once, and the stop in the log
        assert (killed.stdout + killed.stderr).count("Resume with: ") == 1
        assert "stopped by SIGTERM at step" in (run / "train.log").read_text()
        final = next(x for x in killed.stdout.splitlines() if x.startswith("Final loss:"))
        assert f"at step 4 (step {stopped_at})" in final  # the last val's own step, not 7's
    # the documented resume: the same command with ckpt_path=<run>/checkpoints/last.ckpt
    ckpt = run / "checkpoints" / "last.ckpt"
    args = [a for a in _train_args(tmp_path, run) if not a.startswith("hydra.run.dir=")]
    resumed = run_cli("train", *args, f"ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "weights_only" not in resumed.stderr

    a, b = _state(straight), _state(run)
    assert b["global_step"] == a["global_step"] == _STEPS  # last.ckpt: the newest state
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], atol=1e-6, rtol=0)
    moments = [s["exp_avg_sq"] for s in a["optimizer_states"][0]["state"].values()]
    resumed_moments = [s["exp_avg_sq"] for s in b["optimizer_states"][0]["state"].values()]
    for x, y in zip(moments, resumed_moments, strict=True):
        torch.testing.assert_close(y, x, atol=1e-9, rtol=1e-5)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (straight / "checkpoints").iterdir()
    )  # last.ckpt and the best: no last-v1.ckpt, no temp file

    want, got = _curves(straight), _curves(run)
    assert set(got) == set(want)
    for tag in ("val/loss", "train/loss", "train/lr/adamw"):
        steps = [s for s, _ in got[tag]]
        assert steps == sorted(set(steps)) == [s for s, _ in want[tag]], tag  # none repeated
        for (_, x), (_, y) in zip(want[tag], got[tag], strict=True):
            assert abs(x - y) < 1e-5, (tag, x, y)
    log = (run / "train.log").read_text()
    assert log.count("llm train: ") == 2  # one log: the run and its resume
    summary = resumed.stdout[resumed.stdout.rindex("Run folder:") :]
    best = min(v for s, v in want["val/loss"] if s > 0)
    assert f"Best val/loss:   {best:.4f}" in summary  # over the whole run, not the resumed part
    assert f"Last checkpoint: {ckpt}" in summary


@pytest.mark.slow
def test_last_ckpt_is_the_last_state_when_the_loss_gets_worse(tmp_path: Path) -> None:
    """optim.lr warming up to 1.0 diverges: the best checkpoint stays early, last.ckpt ends."""
    run = tmp_path / "run"
    args = _train_args(tmp_path, run, "optim.lr=1.0", "optim.warmup_steps=12", corpus=VERDICT)
    done = run_cli("train", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _state(run)["global_step"] == _STEPS
    (best,) = (run / "checkpoints").glob("step*.ckpt")
    assert best.name != "last.ckpt" and int(best.name[4:10]) < _STEPS


@pytest.mark.slow
def test_a_crafted_checkpoint_cannot_delete_files_outside_its_folder(
    straight_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """ModelCheckpoint deletes the previous best it reads from the checkpoint it resumes."""
    import shutil

    import torch

    _, straight = straight_run
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    ckpt = run / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)
    key = next(k for k in raw["callbacks"] if k.startswith("RunCheckpoint"))
    evil = str(run / "checkpoints" / ".." / ".." / "victim.txt")
    state = raw["callbacks"][key]
    state.update(dirpath=str(run / "checkpoints"), best_model_path=evil, kth_best_model_path=evil)
    state.update(best_k_models={evil: torch.tensor(99.0)}, kth_value=torch.tensor(99.0))
    raw["global_step"] = 4
    torch.save(raw, ckpt)
    args = [a for a in _train_args(tmp_path, run) if not a.startswith("hydra.run.dir=")]
    done = run_cli("train", *args, f"ckpt_path={ckpt}", "trainer.max_steps=16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert victim.read_text() == "keep me"
    assert "ignoring checkpoint paths outside" in (run / "train.log").read_text()


# ----------------------------------------------------------------------------- llm finetune

_FT_STEPS = 8
_WORDS = ["cat", "dog", "sun", "sky", "red", "map", "cup", "pen", "hat", "box", "car", "egg"]


def _finetune_args(tmp_path: Path, run: Path, task: str) -> list[str]:
    init = tmp_path / "init.ckpt"
    if not init.is_file():
        char_checkpoint(init, block_size=192)  # an Alpaca prompt is ~150 characters
    if task == "instruct":
        rows = [{"instruction": f"Repeat {w}", "input": "", "output": f"{w} {w}"} for w in _WORDS]
        data = [f"data.path={write_jsonl(tmp_path / 'rows.jsonl', rows * 4)}", "data.batch_size=4"]
    elif task == "dpo":  # the reference is rebuilt from init= on resume: the same numbers
        rows = [
            {"prompt": f"say {w}:", "chosen": f" {w}", "rejected": f" {v}"}
            for w, v in itertools.pairwise(_WORDS)
        ]
        pairs = write_jsonl(tmp_path / "pairs.jsonl", rows * 3)
        data = [f"data.path={pairs}", "data.batch_size=4"]
    elif task == "grpo":  # sampling draws from the global RNG, which the checkpoint keeps
        rows = [{"prompt": f"say {w}:", "answer": w} for w in _WORDS]
        data = [
            f"data.path={write_jsonl(tmp_path / 'prompts.jsonl', rows * 2)}",
            "data.batch_size=2",
            "reward=format",
            "reward.pattern=.*a.*",  # some random completions have an a: groups that differ
            "task.group_size=4",
            "task.max_new_tokens=6",
            "task.kl_coef=0.1",
        ]
    else:
        corpus = write_corpus(tmp_path)  # in the init checkpoint's char vocabulary
        data = [f"data.path={corpus}", "data.batch_size=4", "data.stride=16"]
    lora = ["lora=default"] if task == "lora" else []
    return [
        f"task={task if task in ('instruct', 'dpo', 'grpo') else 'text'}",
        f"init={init}",
        *data,
        *lora,
        f"block_size={32 if task in ('text', 'lora', 'grpo') else 192}",
        "dropout=0.1",  # masks from the global RNG
        "optim.lr=3e-3",
        "optim.min_lr=3e-3",
        f"trainer.max_steps={_FT_STEPS}",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "fault"),
    [
        ("text", "fit.step@5"),  # back to step 3's last.ckpt
        ("instruct", "checkpoint.write@3"),  # inside a save after step 6's validation
        ("lora", "fit.step@4:SIGTERM"),  # a clean stop; last.ckpt holds the adapters
        ("dpo", "fit.step@5"),
        ("grpo", "fit.step@5:SIGTERM"),
    ],
)
def test_killed_finetune_resumed_from_last_ckpt_equals_an_uninterrupted_run(
    tmp_path: Path, task: str, fault: str
) -> None:
    import torch

    straight, run = tmp_path / "straight", tmp_path / "run"
    done = run_cli("finetune", *_finetune_args(tmp_path, straight, task))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    killed = run_cli("finetune", *_finetune_args(tmp_path, run, task), **{faults.ENV: fault})
    assert killed.returncode == (143 if fault.endswith("SIGTERM") else -signal.SIGKILL)
    assert 0 < _state(run)["global_step"] < _FT_STEPS
    ckpt = run / "checkpoints" / "last.ckpt"
    args = [a for a in _finetune_args(tmp_path, run, task) if not a.startswith("hydra.run.dir")]
    resumed = run_cli("finetune", *args, f"ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    a, b = _state(straight), _state(run)
    assert b["global_step"] == a["global_step"] == _FT_STEPS
    assert (task == "lora") == any("lora_A" in k for k in a["state_dict"])
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], atol=1e-6, rtol=0)
    assert abs(a["val_history"][-1][1]["val/loss"] - b["val_history"][-1][1]["val/loss"]) < 1e-6
    assert [s for s, _ in b["val_history"]] == [s for s, _ in a["val_history"]]
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
