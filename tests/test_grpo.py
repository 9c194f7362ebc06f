"""`task=grpo` / `llm rl`: group advantages and the clipped objective against the formulas, the
rewards, the held-out arithmetic problems, a run that raises its reward, and bad settings,
records and rewards refused by name."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import char_checkpoint, compose, fast_overrides, recorder, run_cli, write_jsonl

from llm.cli.finetune import finetune
from llm.finetuning import rewards
from llm.finetuning.arithmetic import Problem, problems, reverse_digits
from llm.finetuning.grpo import PromptDataModule, group_advantages, grpo_loss, score
from llm.tokenizers import CharTokenizer

WORDS = ["cat", "dog", "sun", "sky", "red", "map", "cup", "pen"]


def share_of_a(prompt: str, completion: str, example: dict[str, Any]) -> float:
    """A reward a random char model already spreads (some completions have more a's)."""
    return completion.count("a") / max(len(completion), 1)


def raises(prompt: str, completion: str, example: dict[str, Any]) -> float:
    raise KeyError("solution")


def not_a_number(prompt: str, completion: str, example: dict[str, Any]) -> float:
    return math.nan


def test_advantages_are_normalised_within_each_group() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4)
    first = r[:4]
    expected = (first - first.mean()) / (first.std() + 1e-4)  # the sample std, as GRPO / TRL
    torch.testing.assert_close(a[:4], expected)
    assert a[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4), rel=1e-6)
    assert torch.equal(a[4:], torch.zeros(4))  # a flat group teaches nothing


def test_the_objective_is_the_policy_gradient_with_the_k3_penalty() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.randint(7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float32)
    logps = logits.log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
    adv = torch.tensor([1.5, -0.5])
    ref = logps.detach() - 0.3 * torch.rand(2, 5)
    loss, kl = grpo_loss(logps, logps.detach(), adv, mask, 0.2, ref, kl_coef=0.1)
    d = ref - logps.detach()
    k3 = torch.exp(d) - d - 1
    n = mask.sum()
    assert kl is not None and kl.item() == pytest.approx(((k3 * mask).sum() / n).item(), rel=1e-6)
    by_hand = ((-adv[:, None] * 1.0 + 0.1 * k3) * mask).sum() / n  # ratio 1: value -A
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # its gradient is REINFORCE's, -A grad log p per completion token, plus the penalty's
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    logps = logits.log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
    surrogate = (
        (-adv[:, None] * logps + 0.1 * (torch.exp(ref - logps) - (ref - logps) - 1)) * mask
    ).sum() / n
    surrogate.backward()
    torch.testing.assert_close(grad, logits.grad)
    assert grad[0, :2].abs().sum() == 0 and grad[1, 3:].abs().sum() == 0  # masked: no gradient


def test_rewards_score_what_they_say() -> None:
    ex = {"prompt": "12+7=", "answer": "19"}
    assert rewards.exact_match("", " 19\nmore", ex) == 1.0
    assert rewards.exact_match("", "191", ex) == 0.0
    assert rewards.arithmetic("", "19", ex) == 1.0 and rewards.arithmetic("", "019", ex) == 1.0
    assert rewards.arithmetic("", "19 apples", ex) == 0.0 and rewards.arithmetic("", "", ex) == 0
    assert rewards.format_reward("", "-4", ex) == 1.0 and rewards.format_reward("", "4x", ex) == 0


def test_arithmetic_holds_out_the_same_problems_never_trained_on() -> None:
    train, held = problems(max_operand=9, ops="+*", held_out=0.1, seed=0)
    assert len(train) + len(held) == 2 * 10 * 10 and len(held) == 20
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert problems(max_operand=9, ops="+*", held_out=0.1, seed=0) == (train, held)
    p = next(p for p in held if p.op == "*")
    assert p.record() == {"prompt": f"{p.a}*{p.b}=", "answer": str(p.a * p.b)}
    with pytest.raises(ValueError, match=r"data\.ops='/'"):
        problems(ops="/")


def test_reversed_answers_are_written_and_scored_least_significant_digit_first() -> None:
    assert reverse_digits("125") == "521" and reverse_digits("-120") == "-021"
    assert reverse_digits(reverse_digits("-4070")) == "-4070"
    _, held = problems(max_operand=99, ops="+", held_out=0.1, seed=0, reverse=True)
    plain = problems(max_operand=99, ops="+", held_out=0.1, seed=0)
    assert [p.prompt for p in held] == [p.prompt for p in plain[1]]  # the same split
    p = Problem(57, "+", 68, reverse=True)
    assert p.answer == 125 and p.record() == {"prompt": "57+68=", "answer": "521", "reversed": True}
    hundred = Problem(50, "+", 50, reverse=True).record()
    assert hundred["answer"] == "001"
    # read least-significant digit first: "001" is 100, "1" and "100" are not
    assert rewards.arithmetic("", "001", hundred) == 1.0
    assert (
        rewards.arithmetic("", "1", hundred) == 0.0 and rewards.arithmetic("", "100", hundred) == 0
    )
    assert rewards.arithmetic("", "0010", hundred) == 1.0  # a trailing zero is a leading one
    tokenizer = CharTokenizer()
    tokenizer.fit(["0123456789+=\n"])
    module = PromptDataModule(
        tokenizer, generator="arithmetic", max_operand=9, ops="+", reverse=True
    )
    module.prepare_data()
    records = [e["record"] for e in module.examples["train"] + module.examples["val"]]
    sums = [sum(map(int, r["prompt"][:-1].split("+"))) for r in records]
    assert len(records) == 100 and all(r["reversed"] for r in records)
    assert [r["answer"] for r in records] == [str(n)[::-1] for n in sums]


def test_a_reward_that_raises_or_is_not_a_number_names_the_example() -> None:
    record = {"prompt": "say cat:", "answer": "cat", "_source": "prompts.jsonl:3"}
    with pytest.raises(ValueError, match=r"failed on prompts\.jsonl:3 .*KeyError: 'solution'"):
        score(raises, "say cat:", " cat", record)
    with pytest.raises(ValueError, match=r"returned nan for prompts\.jsonl:3"):
        score(not_a_number, "say cat:", " cat", record)
    with pytest.raises(ValueError, match="returned None"):
        score(lambda *a: None, "say cat:", " cat", record)  # type: ignore[arg-type,return-value]


def _cfg(tmp: Path, steps: int, *extra: str) -> Any:
    init = tmp / "init.ckpt"
    if not init.is_file():
        char_checkpoint(init, block_size=32)
    rows = [{"prompt": f"say {w}:", "answer": w} for w in WORDS * 4]
    data = write_jsonl(tmp / "prompts.jsonl", rows)
    overrides = [
        "task=grpo",
        f"init={init}",
        f"data.path={data}",
        f"reward._target_={__name__}.share_of_a",
        "task.max_new_tokens=8",
        "optim.lr=3e-3",
        "optim.min_lr=3e-3",
        *fast_overrides(tmp, steps),
        *extra,
    ]
    return compose("finetune", overrides)


@pytest.mark.slow
def test_grpo_raises_the_reward_and_logs_what_it_sampled(tmp_path: Path) -> None:
    result = finetune(_cfg(tmp_path, 12, "trainer.val_check_interval=6", "task.kl_coef=0.05"))
    history = result["module"].val_history
    assert [s for s, _ in history] == [0, 6, 12]
    start, end = history[0][1], history[-1][1]
    assert end["val/reward"] > start["val/reward"] + 0.5  # held-out greedy completions
    assert end["val/loss"] == pytest.approx(-end["val/reward"])
    assert result["module"]._reference is not None  # kl_coef > 0 keeps the reference
    assert len(recorder(result).losses) == 12
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {
        "train/reward",
        "train/kl",
        "train/completion_tokens",
        "train/flat_groups",
        "val/reward",
        "val/accuracy",
    } <= scalars
    texts = acc.Tensors("completions")
    assert [t.step for t in texts] == [0, 6, 12]
    assert "| `say " in texts[-1].tensor_proto.string_val[0].decode()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("task.group_size=1", "task.group_size=1: must be an integer >= 2"),
        ("task.temperature=0", "task.temperature=0: must be a finite number > 0.0"),
        ("task.kl_coef=-1", "task.kl_coef=-1: must be a finite number >= 0.0"),
        ("reward._target_=llm.finetuning.rewards.nothing", "reward._target_"),
    ],
)
def test_llm_rl_refuses_bad_settings_by_name(tmp_path: Path, override: str, named: str) -> None:
    init = char_checkpoint(tmp_path / "init.ckpt")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "say cat:", "answer": "cat"}] * 4)
    done = run_cli(
        "rl", f"init={init}", f"data.path={data}", override, f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert done.returncode == 1, done.stdout[-2000:]
    assert named in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_llm_rl_runs_on_generated_arithmetic_with_its_held_out_problems(tmp_path: Path) -> None:
    from llm.checkpoint import load_language_model, save_checkpoint
    from llm.tokenizers import CharTokenizer
    from llm.training.module import GPTLitModule

    tok = CharTokenizer()
    tok.fit(["0123456789+*=\n"])
    init = save_checkpoint(
        GPTLitModule(
            model={
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 32,
                "block_size": 16,
                "vocab_size": tok.vocab_size,
            },
            tokenizer=tok.to_dict(),
        ),
        tmp_path / "init.ckpt",
    )
    run = tmp_path / "run"
    done = run_cli(
        "rl",
        f"init={init}",
        "reward=arithmetic",
        "data.max_operand=9",
        "data.val_limit=5",
        "task.group_size=2",
        "task.max_new_tokens=3",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "val/accuracy:" in done.stdout and "at step 0 ->" in done.stdout
    lm = load_language_model(run / "checkpoints" / "last.ckpt")
    assert lm.hparams["rl"]["reward"] == {"_target_": "llm.finetuning.rewards.arithmetic"}
    assert lm.hparams["rl"]["group_size"] == 2
