"""The HellaSwag-format benchmark: reading the file, acc / acc_norm against direct forward
passes, the callback that logs it next to val/loss, and `llm report` ranking runs by it."""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import ALPHABET, tiny_overrides, write_corpus, write_jsonl

from llm.evaluation.multiple_choice import (
    encode_examples,
    evaluate_multiple_choice,
    read_examples,
    score_examples,
)
from llm.tokenizers import CharTokenizer

ROWS = [
    {"ctx": "First Citizen: Before we", "endings": ["proceed", "xqzv", "speak"], "label": 0},
    {"ctx": "hear me", "endings": ["speak.", "zzzz.", "walk."], "label": 0},
    {"ctx": "All: Speak,", "endings": ["speak.", "qq.", "First"], "label": 2},
    {"ctx": "", "endings": ["You are", "xz", "resolved rather"], "label": "1"},  # Hub: "1"
]


def test_read_examples_checks_every_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mc.jsonl", ROWS)
    examples = read_examples(path)
    assert [e.label for e in examples] == [0, 0, 2, 1] and len(read_examples(path, 2)) == 2
    bad = [
        ("not json", "mc.jsonl:2: not JSON"),
        (json.dumps({"ctx": "a", "endings": ["b", "c"]}), "needs the fields ['ctx', 'endings'"),
        (json.dumps({"ctx": "a", "endings": ["b"], "label": 0}), "a list of 2 or more"),
        (json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 2}), "index into the 2 endings"),
        (json.dumps({"ctx": 1, "endings": ["b", "c"], "label": 0}), "ctx must be a string"),
    ]
    for line, message in bad:
        path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
            read_examples(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")


def test_acc_and_acc_norm_match_direct_forward_passes(
    tiny_gpt: Any, char_tokenizer: Any, tmp_path: Path
) -> None:
    """acc: highest summed log-probability of " " + ending; acc_norm: highest per-token mean."""
    tok = char_tokenizer
    examples = read_examples(write_jsonl(tmp_path / "mc.jsonl", ROWS))
    correct = correct_norm = 0
    for ex in examples:
        ctx = tok.encode(ex.ctx) or [tok.eot_id]
        sums, means = [], []
        for ending in ex.endings:
            cont = tok.encode(" " + ending)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = F.log_softmax(tiny_gpt(ids[:, :-1])[0][0], dim=-1)
            total = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            sums.append(total)
            means.append(total / len(cont))
        correct += sums.index(max(sums)) == ex.label
        correct_norm += means.index(max(means)) == ex.label
    encoded = encode_examples(tok, examples)
    labels = [ex.label for ex in examples]
    assert score_examples(tiny_gpt, encoded, labels, batch_size=5) == (correct, correct_norm)
    metrics = evaluate_multiple_choice(tiny_gpt, tok, examples, batch_size=2)
    assert metrics == {"acc": correct / 4, "acc_norm": correct_norm / 4, "n": 4.0}


@pytest.mark.slow
def test_the_callback_logs_next_to_val_loss_and_report_ranks_by_it(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """Two short runs with the benchmark on: TensorBoard gets val/mc_acc(_norm) at every
    validation step of val/loss, the last value is the last checkpoint's score, and
    `llm report sort=val/mc_acc_norm` ranks by it."""
    from llm.checkpoint import load_language_model
    from llm.sweeps.report import read_scalars

    corpus = write_corpus(tmp_path, repeats=3)
    with corpus.open("a", encoding="utf-8") as f:  # every character of ROWS has an id
        f.write(ALPHABET)
    mc = write_jsonl(tmp_path / "mc.jsonl", ROWS)
    common = [
        *tiny_overrides(tmp_path, corpus),
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"callbacks.multiple_choice.path={mc}",
    ]
    for lr in ("1e-3", "3e-3"):
        run_dir = f"hydra.run.dir={tmp_path / 'logs' / 'train' / 'runs' / lr}"
        assert llm_main("train", *common, f"optim.lr={lr}", run_dir) == 0
    capsys.readouterr()
    runs = sorted(glob.glob(str(tmp_path / "logs" / "train" / "runs" / "*")))
    assert len(runs) == 2
    for run in map(Path, runs):
        scalars = read_scalars(run)
        val_steps = [s for s, _ in scalars["val/loss"]]
        assert val_steps == [0, 2, 4]  # before training too; the benchmark from step 2 on
        for tag in ("val/mc_acc", "val/mc_acc_norm"):
            assert [s for s, _ in scalars[tag]] == val_steps[1:]
            assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for _, v in scalars[tag])
        lm = load_language_model(run / "checkpoints" / "last.ckpt")
        final = evaluate_multiple_choice(lm.model, lm.tokenizer, read_examples(mc))
        assert scalars["val/mc_acc"][-1][1] == pytest.approx(final["acc"])
        assert scalars["val/mc_acc_norm"][-1][1] == pytest.approx(final["acc_norm"])

    logs = tmp_path / "logs"
    assert llm_main("report", f"dir={logs}", "sort=val/mc_acc_norm") == 0
    assert "highest val/mc_acc_norm first" in capsys.readouterr().out
    with (logs / "report" / "report.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:7] == [
        "rank", "run", "status", "best_val_loss", "best_step", "val/mc_acc", "val/mc_acc_norm",
    ]  # fmt: skip
    scores = [float(r["val/mc_acc_norm"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert llm_main("report", f"dir={logs}", "sort=val/nope") == 1
    assert "can be sorted by best_val_loss, val/mc_acc, val/mc_acc_norm" in capsys.readouterr().err


def test_the_callback_is_off_by_default_and_fails_early_on_a_bad_file(tmp_path: Path) -> None:
    import hydra
    from helpers import compose

    from llm.training.callbacks import MultipleChoiceCallback

    callback = hydra.utils.instantiate(compose("train", []).callbacks.multiple_choice)
    assert isinstance(callback, MultipleChoiceCallback)
    assert callback.path is None  # present but off: one override turns it on
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a"}\n')
    module = type("M", (), {"tokenizer": object()})()
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: needs the fields"):
        MultipleChoiceCallback(str(bad)).setup(None, module, "fit")  # type: ignore[arg-type]
    bad.write_text(json.dumps({"ctx": "a", "endings": ["b", "€"], "label": 0}) + "\n")
    char = CharTokenizer()
    char.fit(["abc "])
    module.tokenizer = char
    with pytest.raises(ValueError, match=r"callbacks\.multiple_choice\.path=.*bad\.jsonl: unknown"):
        MultipleChoiceCallback(str(bad)).setup(None, module, "fit")  # type: ignore[arg-type]


def test_make_local_tasks_writes_a_benchmark_and_harness_tasks(tmp_path: Path) -> None:
    """scripts/make_local_tasks.py: questions from the text's held-out end, valid rows, one
    true ending each, and task YAMLs that point at the data files."""
    import importlib.util

    from helpers import ROOT, VERDICT

    spec = importlib.util.spec_from_file_location("mlt", ROOT / "scripts" / "make_local_tasks.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = VERDICT.read_text(encoding="utf-8")
    mc, ppl, mc_yaml, ppl_yaml = script.make_tasks(text, tmp_path / "tasks", rows=5)
    examples = read_examples(mc)
    held_out = text[int(len(text) * 0.9) :]
    assert len(examples) == 5
    for ex in examples:
        assert len(ex.endings) == 4 and f"{ex.ctx} {ex.endings[ex.label]}" in " ".join(
            " ".join(line.split()) for line in held_out.splitlines()
        )
    assert str(mc) in mc_yaml.read_text() and str(ppl) in ppl_yaml.read_text()
    assert all(len(json.loads(line)["text"]) > 80 for line in ppl.read_text().splitlines())
