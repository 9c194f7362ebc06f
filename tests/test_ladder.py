"""scripts/ladder.py: every rung's data comes from the training problems only (the held-out ones
appear in none), the demonstrations slip as the recipe says, the preference pairs are encodable
and differ, and the table reports what the rungs measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import ROOT

from llm.finetuning.arithmetic import Problem, problems, reverse_digits

_spec = importlib.util.spec_from_file_location("ladder", ROOT / "scripts" / "ladder.py")
assert _spec is not None and _spec.loader is not None
ladder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ladder)


def test_no_rung_sees_a_held_out_problem(tmp_path: Path) -> None:
    train, held_out = problems(
        ladder.MAX_OPERAND, ladder.OPS, held_out=0.1, seed=0, reverse=ladder.REVERSE
    )
    paths = ladder.write_data(tmp_path, list(train), seed=0)
    text = paths["pretrain"].read_text(encoding="utf-8")
    lines = set(text.splitlines())
    assert all(f"{p.prompt}{p.text}" in lines for p in train)
    carried = next(p for p in train if p.answer >= 100)  # digits reversed: 57+68=521
    assert f"{carried.prompt}{str(carried.answer)[::-1]}" in lines
    assert not any(line.startswith(p.prompt) for p in held_out for line in lines)
    instruct = [json.loads(x) for x in paths["instruct"].read_text().splitlines()]
    pairs = [json.loads(x) for x in paths["dpo"].read_text().splitlines()]
    held = {p.prompt for p in held_out}
    assert len(instruct) == len(pairs) == len(train)
    assert not held & {r["instruction"] for r in instruct} and not held & {
        r["prompt"] for r in pairs
    }
    answers = {p.prompt: p for p in train}
    slipped = [r["output"] != answers[r["instruction"]].text for r in instruct]
    for record, slip in zip(instruct, slipped, strict=True):  # right, or the carry out dropped
        p = answers[record["instruction"]]
        assert record["output"] == (ladder.carry_slip(p) if slip else p.text)
        assert not slip or p.answer >= 100
    past_99 = sum(p.answer >= 100 for p in train)
    assert abs(sum(slipped) / past_99 - ladder.SLIP) < 0.03  # 4,475 sums: 4 sigma
    for pair in pairs:
        p = answers[pair["prompt"]]
        assert pair["chosen"] == p.text != pair["rejected"] and pair["rejected"].isdigit()
        # the carry into the most significant digit flipped: off by that digit's place value
        place = 10 ** (len(str(p.answer)) - 1)
        assert abs(int(reverse_digits(pair["rejected"])) - p.answer) == place
    assert lines == {f"{p.prompt}{p.text}" for p in train}  # the problems and nothing else
    assert len(text.splitlines()) == 20 * len(train)  # 20 shuffled passes


def test_a_carry_slip_is_the_mistake_of_a_model_learning_to_add() -> None:
    slip = ladder.carry_slip
    assert slip(Problem(57, "+", 68, reverse=True)) == "52"  # 125, the carry out dropped
    assert slip(Problem(40, "+", 43, reverse=True)) == "39"  # 83, a carry that was not there
    assert slip(Problem(45, "+", 54, reverse=True)) == "901"  # 99 + 10
    assert slip(Problem(3, "+", 4, reverse=True)) == "8" and slip(Problem(3, "+", 4)) == "8"
    assert slip(Problem(57, "+", 68)) == "25"


def test_the_table_reports_each_rung_and_seed() -> None:
    rungs = {"pretrain": 0.3, "instruct": 0.25, "dpo": 0.2, "grpo": 0.5}
    per_seed = {
        s: {
            r: {
                "accuracy": a + s / 100,
                "past_99": a / 2,
                "below_100": 1.5 * a + s / 100,
                "seconds": 10.0 * (s + 1),
            }
            for r, a in rungs.items()
        }
        for s in (0, 1)
    }
    for s in per_seed:
        per_seed[s]["dpo"].update(reward_acc_start=0.5, reward_acc_end=0.8 + s / 10)
    table = ladder.table(per_seed).splitlines()
    assert table[0] == "| rung | seed 0 | seed 1 | mean | wall time (mean) |"
    assert table[5] == "| grpo | 50.0% | 51.0% | 50.5% | 15 s |"
    assert table[7] == "| rung | seed 0: past 99 / below 100 | seed 1: past 99 / below 100 |"
    assert table[10] == "| instruct | 12.5% / 37.5% | 12.5% / 38.5% |"
    assert table[-1].endswith("seed 0: 0.50 -> 0.80, seed 1: 0.50 -> 0.90")


def test_the_score_decodes_prompts_of_one_length_together_as_each_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from llm.checkpoint import load_language_model, save_checkpoint
    from llm.finetuning import rewards
    from llm.tokenizers import CharTokenizer
    from llm.training.module import GPTLitModule

    torch.manual_seed(8)  # a random model whose greedy answers differ: some end at once
    tok = CharTokenizer()
    tok.fit(["0123456789+=\n"])
    model = {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0, "block_size": 32}
    module = GPTLitModule(model={**model, "vocab_size": tok.vocab_size}, tokenizer=tok.to_dict())
    ckpt = save_checkpoint(module, tmp_path / "random.ckpt")
    # prompts of 4, 5 and 6 characters; among those of 5, some end at once and one runs on
    pairs = ((3, 4), (12, 5), (57, 68), (9, 91), (40, 43), (28, 0))
    held = [Problem(a, "+", b, reverse=True) for a, b in pairs]
    said: dict[str, str] = {}

    def spy(prompt: str, completion: str, example: dict) -> float:
        said[prompt] = completion
        return float(prompt in ("12+5=", "9+91="))

    monkeypatch.setattr(rewards, "arithmetic", spy)
    # the share the reward calls right; apart: 57+68 and 9+91 are past 99 (9+91 right), the
    # other four below 100 (12+5 right)
    assert ladder.score(ckpt, held) == {"accuracy": 2 / 6, "past_99": 1 / 2, "below_100": 1 / 4}
    lm = load_language_model(ckpt)
    eot = lm.tokenizer.eot_id
    for p in held:  # each prompt decoded alone, greedy, gives what the batch gave
        idx = torch.tensor([lm.tokenizer.encode(p.prompt)])
        new = lm.model.generate(idx, 6, temperature=0.0, stop_token=eot)[0, idx.size(1) :]
        new = new.tolist()
        new = new[: new.index(eot)] if eot in new else new
        assert said[p.prompt] == lm.tokenizer.decode(new)
    assert said["12+5="] == "" and said["28+0="] == "======"  # one batch, rows of two lengths


def test_a_rung_run_before_is_reused_only_for_the_same_command(tmp_path: Path) -> None:
    """A finished rung is not run again, but a folder from another recipe (the instruct rung
    on the Alpaca template, say) is not taken for this one's."""
    run = tmp_path / "instruct"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    done = {"seconds": 12.5, "argv": ["finetune", "task=instruct", "task.template=null"]}
    (run / "seconds.json").write_text(json.dumps(done))
    assert ladder.llm(run, "finetune", "task=instruct", "task.template=null") == 12.5
    with pytest.raises(SystemExit, match=r"holds a rung run by another command"):
        ladder.llm(run, "finetune", "task=instruct")
    (run / "seconds.json").write_text(json.dumps({"seconds": 12.5}))  # an older ladder's
    with pytest.raises(SystemExit, match=r"remove it, or give the ladder another --out"):
        ladder.llm(run, "finetune", "task=instruct", "task.template=null")
