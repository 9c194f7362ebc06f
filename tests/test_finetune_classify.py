"""`task=classify`: CSV/TSV/JSONL readers, padding, last-token head, accuracy, CLI, LoRA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    char_checkpoint,
    compose,
    fast_overrides,
    recorder,
    write_jsonl,
)

from llm.checkpoint import export_merged, load_checkpoint
from llm.cli.finetune import finetune
from llm.finetuning.classify import ClassificationDataModule, ClassifierModule
from llm.tokenizers import CharTokenizer

SPAM = ["win cash now", "free prize, call now!", "you won a free trip", "claim cash prize"]
HAM = ["see you at lunch", "running late, sorry", "dinner at six?", "call me tonight"]


def _rows(n: int = 3) -> list[dict[str, str]]:
    return [{"text": f"{t} {i}", "label": lab} for i in range(n) for lab, ts in
            (("spam", SPAM), ("ham", HAM)) for t in ts]  # fmt: skip


def test_readers_padding_and_column_errors(tmp_path: Path, char_tokenizer: CharTokenizer) -> None:
    rows = _rows(1)
    csv = tmp_path / "d.csv"
    csv.write_text("body,kind\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows))
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = char_tokenizer
    for path, cols in (
        (csv, ("body", "kind")),
        (tsv, ("text", "label")),
        (jsonl, ("text", "label")),
    ):
        dm = ClassificationDataModule(
            tok, str(path), *cols, max_length=12, val_fraction=0.25, test_fraction=0.25
        )
        dm.prepare_data()
        assert dm.labels == ["ham", "spam"]
        assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [4, 2, 2]
        ids, lengths, labels = next(iter(dm.train_dataloader()))
        assert ids.shape == (4, 12) and labels.dtype == torch.long
        for row, n in zip(ids, lengths, strict=True):  # truncated to 12, right-padded with eot
            assert 1 <= n <= 12 and (row[n:] == tok.eot_id).all()
        assert lengths.max() == 12  # "free prize, call now! 0" is longer than 12 chars
    with pytest.raises(
        ValueError,
        match=r"record 0 has no \['text', 'label'\] \(columns found: \['body', 'kind'\]\)",
    ):
        ClassificationDataModule(tok, str(csv)).prepare_data()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no records"):
        ClassificationDataModule(tok, str(empty)).prepare_data()


def test_head_reads_the_last_real_token(char_tokenizer: CharTokenizer) -> None:
    tok = char_tokenizer
    torch.manual_seed(0)
    model = {
        "vocab_size": tok.vocab_size,
        "block_size": 16,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
    }
    module = ClassifierModule(model, tok.to_dict(), labels=["a", "b"]).eval()
    ids = torch.tensor([tok.encode("hello")])
    padded = torch.cat([ids, torch.full((1, 5), tok.eot_id)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(module(padded, torch.tensor([5])), module(ids))
        assert not torch.allclose(module(padded), module(ids))  # the padding token differs


@pytest.mark.slow
def test_classify_overfits_last_block_only_and_cli(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    init = char_checkpoint(tmp_path / "init.ckpt", block_size=32)
    data = tmp_path / "sms.tsv"
    data.write_text(
        "message\tcategory\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in _rows())
    )
    cfg = compose(
        "finetune",
        [
            f"init={init}",
            "task=classify",
            f"data.path={data}",
            "data.text_column=message",
            "data.label_column=category",
            "data.val_fraction=0.25",
            "data.test_fraction=0.25",
            "task.trainable_layers=1",
            "optim.lr=3e-3",
            "optim.min_lr=3e-3",
            *fast_overrides(tmp_path, 25),
        ],
    )
    result = finetune(cfg)
    losses = recorder(result).losses
    assert losses[-1] < 0.1 < losses[0]
    # held-out messages (other digits) from a 2-layer random init: above chance, not exact
    # (seed 1337's train order: 3 of 4 test and 2 of 3 val messages right)
    assert result["test"]["test/acc"] > 0.5
    assert result["metrics"]["val/acc"] > 0.5
    module = result["module"]
    expected = sum(p.numel() for m in (module.model.h[-1], module.model.ln_f, module.head)
                   for p in m.parameters())  # fmt: skip
    assert result["params/trainable"] == expected == 12834
    assert not module.model.h[0].attn.c_attn.weight.requires_grad

    ckpt = result["best_model_path"]
    from llm.checkpoint import load_checkpoint

    assert load_checkpoint(ckpt).predict_texts(["free prize, call now! 7"])[0][0] == "spam"
    raw = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert raw["labels"] == ["ham", "spam"] and raw["tokenizer"]["kind"] == "char"
    assert llm_main("classify", f"ckpt_path={ckpt}", "text=see you at lunch 9") == 0
    label, prob = capsys.readouterr().out.strip().split("\t")
    assert label == "ham" and 0.5 < float(prob) <= 1.0
    # llm generate asks for a language model: it says which command the classifier needs
    with pytest.raises(ValueError, match=r"is a classifier checkpoint.*use llm classify"):
        load_checkpoint(ckpt, kind="lm")


@pytest.mark.slow
def test_classify_lora_head_and_adapters_then_merge(tmp_path: Path) -> None:
    init = char_checkpoint(tmp_path / "init.ckpt", block_size=32)
    data = write_jsonl(tmp_path / "d.jsonl", _rows())
    cfg = compose(
        "finetune",
        [
            f"init={init}",
            "task=classify",
            f"data.path={data}",
            "data.test_fraction=0",
            "data.val_fraction=0.25",
            "lora=default",
            "lora.r=2",
            "lora.targets=[attn.c_attn]",
            "optim.lr=1e-2",
            "optim.min_lr=1e-2",
            *fast_overrides(tmp_path, 25),
        ],
    )
    result = finetune(cfg)
    assert "test" not in result
    assert result["params/trainable"] == 2 * 2 * (32 + 96) + (32 * 2 + 2)  # adapters + head
    losses = recorder(result).losses
    assert losses[-1] < losses[0] - 0.3
    base = torch.load(init, weights_only=True)["state_dict"]
    trained = torch.load(result["last_model_path"], weights_only=True)["state_dict"]
    for k, v in base.items():
        assert torch.equal(trained[k], v), k

    merged = export_merged(result["last_model_path"], tmp_path / "merged.ckpt")
    plain = ClassifierModule.load_from_checkpoint(merged, weights_only=True).eval()
    adapter = load_checkpoint(result["last_model_path"])
    assert plain.hparams["lora"] is None and not any("lora" in k for k in plain.state_dict())
    ids = torch.randint(0, plain.config.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), adapter(ids), rtol=0, atol=1e-5)
    assert json.loads(json.dumps(plain.hparams["labels"])) == ["ham", "spam"]
