"""`task=dpo`: the objective against the formula written out, step 0 (policy == reference),
the masking, the reference under LoRA, precomputed reference log-probs, a run that learns the
preference, and bad records and settings refused by name."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import char_checkpoint, compose, fast_overrides, run_cli, write_jsonl

from llm.checkpoint import load_language_model
from llm.cli.finetune import finetune
from llm.finetuning.logprobs import IGNORE, token_logps
from llm.finetuning.preference import (
    PreferenceDataModule,
    check_pair_records,
    collate_pairs,
    encode_pair,
    preference_loss,
)
from llm.prompts import format_prompt
from llm.tokenizers import CharTokenizer

WORDS = ["cat", "dog", "sun", "sky", "red", "map", "cup", "pen"]
# learnable: the chosen response repeats the word of the prompt, the rejected one another word
PAIRS = [
    {"prompt": f"say {a}:", "chosen": f" {a}", "rejected": f" {b}"}
    for a in WORDS
    for b in WORDS
    if a != b
]


def _logps(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g) * 20 for _ in range(4)]


@pytest.mark.parametrize(("beta", "smoothing"), [(0.1, 0.0), (0.5, 0.2)])
def test_sigmoid_loss_is_the_formula_written_out(beta: float, smoothing: float) -> None:
    pc, pr, rc, rr = _logps()
    loss, stats = preference_loss(pc, pr, rc, rr, beta, "sigmoid", smoothing)
    by_hand = []
    for i in range(len(pc)):
        h = (pc[i] - pr[i]).item() - (rc[i] - rr[i]).item()
        sig = 1 / (1 + math.exp(-beta * h))
        by_hand.append(-(1 - smoothing) * math.log(sig) - smoothing * math.log(1 - sig))
    assert loss.item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    assert stats["margin"].item() == pytest.approx((chosen - rejected).mean().item(), rel=1e-5)
    assert stats["chosen_reward"].item() == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert stats["reward_acc"].item() == pytest.approx((chosen > rejected).float().mean().item())


def test_ipo_loss_is_the_formula_written_out() -> None:
    pc, pr, rc, rr = _logps(seed=1)
    beta = 0.3
    loss, _ = preference_loss(pc, pr, rc, rr, beta, "ipo")
    h = (pc - pr) - (rc - rr)
    by_hand = sum((h[i].item() - 1 / (2 * beta)) ** 2 for i in range(len(h))) / len(h)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_trl_computes_the_same_loss_on_the_same_numbers() -> None:
    trl = pytest.importorskip("trl")  # optional: TRL is not a dependency
    pc, pr, rc, rr = _logps(seed=2)
    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)
    trainer.beta, trainer.label_smoothing, trainer.loss_type = 0.1, 0.0, "sigmoid"
    trainer.f_divergence_type, trainer.use_weighting = "reverse_kl", False
    losses = trl.DPOTrainer.dpo_loss(trainer, pc, pr, rc, rr)[0]
    ours, _ = preference_loss(pc, pr, rc, rr, 0.1, "sigmoid")
    assert ours.item() == pytest.approx(losses.mean().item(), rel=1e-5)


def test_equal_policy_and_reference_give_log_2_and_zero_margins() -> None:
    pc, pr, _, _ = _logps(seed=3)
    loss, stats = preference_loss(pc, pr, pc.clone(), pr.clone(), 0.1, "sigmoid", 0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats["margin"].item() == 0.0 and stats["chosen_reward"].item() == 0.0
    assert stats["reward_acc"].item() == 0.5  # a tie counts half: the chance level


@pytest.fixture
def tok() -> CharTokenizer:
    from helpers import ALPHABET

    t = CharTokenizer()
    t.fit([ALPHABET])
    return t


def test_pairs_mask_the_prompt_and_padding_and_nothing_masked_counts(tok: CharTokenizer) -> None:
    records = [PAIRS[0], {"prompt": "say map:", "chosen": " map map map", "rejected": " x"}]
    pairs = [encode_pair(tok, r, "alpaca", 256) for r in records]
    batch = collate_pairs(pairs, tok.eot_id)
    x, y = batch["x"], batch["y"]
    assert x.shape == y.shape == (4, max(len(p.chosen) for p in pairs) - 1)
    prompt = tok.encode(format_prompt({"instruction": "say map:"}))
    assert pairs[1].n_prompt == len(prompt) and pairs[1].chosen[: len(prompt)] == prompt
    for row, ids in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
        n_prompt = pairs[row % 2].n_prompt
        kept = y[row] != IGNORE
        assert torch.equal(y[row][kept], torch.tensor(ids[n_prompt:]))  # response + eot
        assert y[row][kept][-1] == tok.eot_id
    # the log-probs do not see what is masked: change the logits there, the sums stay
    logits = torch.randn(*x.shape, tok.vocab_size)
    changed = logits.clone()
    changed[y == IGNORE] = torch.randn_like(changed[y == IGNORE]) * 100
    assert torch.equal(token_logps(logits, y).sum(-1), token_logps(changed, y).sum(-1))
    assert (token_logps(logits, y)[y == IGNORE] == 0).all()


def test_an_empty_response_is_end_of_text_alone_not_a_missing_field(tok: CharTokenizer) -> None:
    """A model's own empty answer (it stopped at once) is a fair rejected response: its
    log-probability is that of end-of-text right after the prompt."""
    record = {"prompt": "say cat:", "chosen": " cat", "rejected": ""}
    check_pair_records([record], "pairs.jsonl")
    pair = encode_pair(tok, record, None, 64)
    assert pair.rejected == [*tok.encode("say cat:"), tok.eot_id]
    assert pair.chosen == [*tok.encode("say cat: cat"), tok.eot_id]
    y = collate_pairs([pair], tok.eot_id)["y"]
    assert y[1][y[1] != IGNORE].tolist() == [tok.eot_id]


def _cfg(tmp: Path, steps: int, *extra: str) -> Any:
    init = tmp / "init.ckpt"
    if not init.is_file():
        char_checkpoint(init, block_size=64)
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS)
    overrides = [
        "task=dpo",
        f"init={init}",
        f"data.path={data}",
        "data.batch_size=8",
        "optim.lr=2e-3",
        "optim.min_lr=2e-3",
        "task.beta=0.5",
        *fast_overrides(tmp, steps),
        *extra,
    ]
    return compose("finetune", overrides)


@pytest.mark.slow
def test_dpo_learns_the_preference_and_the_checkpoint_is_a_language_model(
    tmp_path: Path,
) -> None:
    result = finetune(_cfg(tmp_path, 60, "trainer.limit_val_batches=null"))
    history = result["module"].val_history
    start, end = history[0][1], history[-1][1]
    assert [s for s, _ in history][:: len(history) - 1] == [0, 60]
    assert start["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["val/reward_acc"] == 0.5 and start["val/kl"] == pytest.approx(0.0, abs=1e-6)
    assert end["val/reward_acc"] >= 0.8 and end["val/margin"] > 0 and end["val/kl"] > 0
    assert end["val/loss"] < start["val/loss"]
    lm = load_language_model(result["last_model_path"])
    assert lm.template is None and lm.hparams["preference"]["beta"] == 0.5  # the init's template


@pytest.mark.slow
def test_precomputed_reference_gives_the_same_run(tmp_path: Path) -> None:
    a = finetune(_cfg(tmp_path / "a", 4))
    b = finetune(_cfg(tmp_path / "b", 4, "task.precompute_ref=true"))
    assert all(p.reference is not None for p in b["datamodule"].pairs["train"])
    for key in ("val/loss", "val/reward_acc", "val/margin"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-5)
    sa, sb = a["module"].state_dict(), b["module"].state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_under_lora_the_reference_is_the_base_weights_without_a_copy(tmp_path: Path) -> None:
    result = finetune(_cfg(tmp_path, 6, "lora=default", "optim.lr=1e-2", "optim.min_lr=1e-2"))
    module = result["module"]
    assert module._reference is None  # no second copy of the weights
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # adapters off == the init weights; on: they moved
        trained = module.model.eval()(x)[0]
        reference = module.reference_logits(x)
    init = load_language_model(tmp_path / "init.ckpt").model
    torch.testing.assert_close(reference, init(x)[0], atol=1e-5, rtol=0)
    assert (trained - reference).abs().max() > 1e-4
    assert result["metrics"]["val/kl"] > 0


def test_bad_records_and_settings_are_refused_by_name(tmp_path: Path, tok: CharTokenizer) -> None:
    rows = [*PAIRS[:3], {"prompt": "say cat:", "chosen": " cat"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad.jsonl:4: a preference record lacks \['rejected'\]"):
        PreferenceDataModule(tok, str(path), block_size=64).prepare_data()
    null = write_jsonl(tmp_path / "null.jsonl", [{"prompt": "a", "chosen": "b", "rejected": None}])
    with pytest.raises(
        ValueError, match=r"null\.jsonl:1: a preference record lacks \['rejected'\]"
    ):
        PreferenceDataModule(tok, str(null), block_size=64).prepare_data()
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"same\.jsonl:1: chosen and rejected are the same"):
        PreferenceDataModule(tok, str(same), block_size=64).prepare_data()
    chat = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "user", "content": "x"}],
            "rejected": " y",
        }
    ]
    with pytest.raises(ValueError, match="field 'chosen' must hold assistant messages only"):
        PreferenceDataModule(
            tok, str(write_jsonl(tmp_path / "c.jsonl", chat)), block_size=64
        ).prepare_data()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("task.beta=0", "task.beta=0: must be a finite number > 0.0"),
        ("task.beta=-1", "task.beta=-1: must be a finite number > 0.0"),
        ("task.loss=hinge", "task.loss='hinge' is not one of ['sigmoid', 'ipo']"),
        ("task.label_smoothing=0.5", "task.label_smoothing=0.5: must be a finite number"),
    ],
)
def test_the_command_refuses_bad_settings(tmp_path: Path, override: str, named: str) -> None:
    init = char_checkpoint(tmp_path / "init.ckpt")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    done = run_cli(
        "finetune",
        "task=dpo",
        f"init={init}",
        f"data.path={data}",
        override,
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode == 1
    assert named in done.stderr and "Traceback" not in done.stderr


def test_the_chat_form_renders_like_the_string_form(tok: CharTokenizer) -> None:
    text = encode_pair(tok, PAIRS[0], None, 64)
    chat = {
        "prompt": [{"role": "user", "content": PAIRS[0]["prompt"]}],
        "chosen": [{"role": "assistant", "content": PAIRS[0]["chosen"]}],
        "rejected": [{"role": "assistant", "content": PAIRS[0]["rejected"]}],
    }
    assert encode_pair(tok, chat, None, 64) == text
    assert text.chosen == [*tok.encode("say cat: cat"), tok.eot_id]  # a base model: plain text


def test_a_parquet_file_of_chat_records_with_a_val_file(tmp_path: Path, tok: CharTokenizer) -> None:
    """A Hugging Face preference dataset's local parquet files: the chat form, nested lists of
    messages kept; data.val_path holds the val split out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def chat(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]

    train, val = tmp_path / "train.parquet", tmp_path / "val.parquet"
    pq.write_table(pa.Table.from_pylist(chat(PAIRS[:10])), train)
    pq.write_table(pa.Table.from_pylist(chat(PAIRS[10:13])), val)
    dm = PreferenceDataModule(tok, str(train), val_path=str(val), block_size=64)
    dm.prepare_data()
    assert len(dm.pairs["train"]) == 10 and len(dm.pairs["val"]) == 3
    assert dm.pairs["val"][0] == encode_pair(tok, PAIRS[10], None, 64)
