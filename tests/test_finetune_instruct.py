"""`task=instruct`: the prompt templates, exact prompt masking, training, responses.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import char_checkpoint, compose, fast_overrides, recorder

from llm.checkpoint import load_checkpoint, load_language_model
from llm.cli.finetune import finetune
from llm.finetuning.instruct import (
    InstructDataModule,
    collate,
    encode_example,
    format_prompt,
    generate_responses,
)
from llm.tokenizers import CharTokenizer

WORDS = ["cat", "dog", "sun", "sky", "red", "map", "cup", "pen"]
RECORDS = [
    {"instruction": f"Repeat {w}", "input": "twice" if i % 2 else "", "output": f"{w} {w}"}
    for i, w in enumerate(WORDS)
]


def test_alpaca_template_exact() -> None:
    preamble = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    )
    assert format_prompt({"instruction": "Add 2+2", "input": "", "output": "4"}) == (
        f"{preamble}\n\n### Instruction:\nAdd 2+2\n\n### Response:\n"
    )
    assert format_prompt({"instruction": "Translate", "input": "hola"}) == (
        f"{preamble}\n\n### Instruction:\nTranslate\n\n### Input:\nhola\n\n### Response:\n"
    )


@pytest.mark.parametrize(
    ("template", "prompt"),
    [
        ("alpaca", format_prompt(RECORDS[1])),
        (None, "Repeat dog\n\ntwice"),  # no template: the instruction, then its input
    ],
)
def test_the_prompt_is_rendered_with_the_task_template(
    template: str | None, prompt: str, char_tokenizer: CharTokenizer
) -> None:
    tok = char_tokenizer
    ids, n_prompt = encode_example(tok, RECORDS[1], 256, template)
    assert ids[:n_prompt] == tok.encode(prompt)
    assert tok.decode(ids[n_prompt:-1]) == "dog dog" and ids[-1] == tok.eot_id
    ids, n_prompt = encode_example(tok, RECORDS[0], 256, None)  # an empty input adds nothing
    assert tok.decode(ids[:n_prompt]) == "Repeat cat"


@pytest.mark.parametrize(
    ("override", "init_template", "rendered"),
    [("alpaca", None, "alpaca"), ("none", "alpaca", None), ("auto", "chat", "chat")],
)
def test_task_template_names_one_or_takes_the_inits(
    override: str, init_template: str | None, rendered: str | None
) -> None:
    """``none`` is plain text, as `llm chat template=none` spells it; ``auto`` the init's.
    The same for the post-training tasks, which render prompts as the instruct run did."""
    from types import SimpleNamespace

    from llm.finetuning.tasks import InstructFinetune, PreferenceFinetune, RLFinetune

    init = SimpleNamespace(template=init_template)
    tasks = [
        InstructFinetune("instruct", template=override),
        PreferenceFinetune("dpo", template=override),
        RLFinetune("grpo", template=override),
    ]
    assert [task.template_of(init) for task in tasks] == [rendered] * 3


def test_collate_masks_exactly_the_prompt_and_padding(char_tokenizer: CharTokenizer) -> None:
    tok = char_tokenizer
    examples = [encode_example(tok, r, 256) for r in RECORDS[:3]]
    examples.append(encode_example(tok, {"instruction": "Say hi", "output": "hi there"}, 256))
    x, y = collate(examples, tok.eot_id, mask_prompt=True)
    longest = max(len(ids) for ids, _ in examples)
    assert x.shape == y.shape == (4, longest - 1)
    for row, (ids, n_prompt) in enumerate(examples):
        n_response = len(ids) - n_prompt - 1
        kept = y[row] != -100
        assert int(kept.sum()) == n_response + 1  # response tokens + the closing eot
        assert torch.equal(y[row][kept], torch.tensor(ids[n_prompt:]))
        assert y[row][kept][-1] == tok.eot_id
        assert (x[row, len(ids) - 1 :] == tok.eot_id).all()  # inputs padded with eot
        assert torch.equal(x[row, : len(ids) - 1], torch.tensor(ids[:-1]))
    x2, y2 = collate(examples, tok.eot_id, mask_prompt=False)
    assert torch.equal(x2, x)
    for row, (ids, _) in enumerate(examples):
        assert int((y2[row] != -100).sum()) == len(ids) - 1  # only padding masked


def test_records_missing_keys_name_the_record(
    tmp_path: Path, char_tokenizer: CharTokenizer
) -> None:
    bad = [*RECORDS[:2], {"instruction": "no answer"}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"Alpaca record 2 lacks string field\(s\) \['output'\]"):
        InstructDataModule(char_tokenizer, str(path), max_length=64).prepare_data()


def test_records_whose_prompt_fills_max_length_are_left_out_or_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, char_tokenizer: CharTokenizer
) -> None:
    """A prompt that fills max_length leaves no target: its loss would be 0/0 (NaN)."""
    tok = char_tokenizer
    long = {"instruction": "Repeat " + "cat " * 40, "input": "", "output": "cat"}
    max_length = max(len(tok.encode(format_prompt(r))) for r in RECORDS) + 8  # these fit
    path = tmp_path / "a.json"
    path.write_text(json.dumps([*RECORDS, long]))
    val = tmp_path / "v.json"
    val.write_text(json.dumps(RECORDS[:2]))
    dm = InstructDataModule(tok, str(path), val_path=str(val), max_length=max_length)
    with caplog.at_level("WARNING"):
        dm.prepare_data()
    assert len(dm.records["train"]) == len(RECORDS) and long not in dm.records["train"]
    assert "1 of 9 train records have a prompt of max_length=" in caplog.text
    _, y = next(iter(dm.train_dataloader()))
    assert ((y != -100).sum(dim=1) > 0).all()  # every example keeps a target
    path.write_text(json.dumps([long, long]))
    with pytest.raises(ValueError, match=r"2 of 2 train records.*raise data.max_length"):
        InstructDataModule(tok, str(path), val_path=str(val), max_length=max_length).prepare_data()


@pytest.mark.slow
@pytest.mark.parametrize("template", ["alpaca", None])
def test_instruct_overfits_and_writes_responses(tmp_path: Path, template: str | None) -> None:
    init = char_checkpoint(tmp_path / "init.ckpt", block_size=160)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(RECORDS))
    cfg = compose(
        "finetune",
        [
            f"init={init}",
            "task=instruct",
            f"task.template={template or 'null'}",
            f"data.path={data}",
            "data.val_fraction=0.25",
            "task.max_new_tokens=12",
            "optim.lr=3e-3",
            "optim.min_lr=3e-3",
            *fast_overrides(tmp_path, 25),
        ],
    )
    result = finetune(cfg)
    losses = recorder(result).losses
    assert losses[-1] < losses[0] - 1.5  # response-only loss on 6 tiny examples
    responses_path = Path(result["responses_path"])
    assert responses_path == Path(result["best_model_path"]).parent / "responses.json"
    responses = json.loads(responses_path.read_text())
    val = result["datamodule"].records["val"]
    assert [r["instruction"] for r in responses] == [r["instruction"] for r in val]
    assert all(set(r) == {"instruction", "input", "output", "response"} for r in responses)
    assert all(isinstance(r["response"], str) and len(r["response"]) <= 12 for r in responses)
    assert not list(responses_path.parent.glob(".*.tmp"))
    best = load_checkpoint(result["best_model_path"])
    again = generate_responses(best, val, max_new_tokens=12, template=template)
    assert [r["response"] for r in again] == [r["response"] for r in responses]
    module = load_checkpoint(result["last_model_path"])  # no LoRA: a plain LM checkpoint
    assert module.config.block_size == 160
    # the checkpoint says how to render prompts, so `llm chat` renders as the run trained
    assert module.hparams["template"] == template
    assert load_language_model(result["last_model_path"]).template == template
    n_prompt = [n for _, n in result["datamodule"].examples["train"]]
    longest = {"alpaca": 170, None: 20}[template]  # an empty Alpaca prompt is 140 chars
    assert max(n_prompt) < longest and (template is None or min(n_prompt) > 120)


def test_resuming_with_another_template_is_refused(tmp_path: Path) -> None:
    """A run resumed with another task.template would train on prompts of two forms."""
    from llm.checkpoint import CheckpointError, check_resumable

    ckpt = char_checkpoint(tmp_path / "plain.ckpt")
    module = load_checkpoint(ckpt)
    check_resumable(ckpt, module, max_steps=5)
    module.hparams["template"] = "alpaca"
    with pytest.raises(CheckpointError, match=r"template: checkpoint None, this run 'alpaca'"):
        check_resumable(ckpt, module, max_steps=5)


def test_a_prompt_the_vocabulary_cannot_join_is_named_by_its_record() -> None:
    """Each field encodes, but the blank line the plain template puts before the input does
    not: the record is named, not a bare tokenizer error."""
    tok = CharTokenizer()
    tok.fit(["abc xyz"])
    record = {"instruction": "abc", "input": "xyz", "output": "a", "_source": "f.json:3"}
    with pytest.raises(ValueError, match=r"^f.json:3: its prompt \(template None\) cannot be"):
        encode_example(tok, record, 64, None)
