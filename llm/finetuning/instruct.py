"""Instruction finetuning on Alpaca-format records (instruction, input, output).

Prompts use the task's template (:mod:`llm.prompts`, which the checkpoint records so that ``llm
chat`` and the post-training tasks render alike): Alpaca by default, the tokenizer's own chat
template, or none (the instruction as plain text, the response right after it); the
collate function pads with end-of-text and sets targets to -100 on padding (the first eot stays:
it teaches the model to stop) and, by default, on the prompt, so the loss is over response tokens
only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from llm.finetuning.records import (
    SOURCE,
    ExampleSplits,
    encode_field,
    example_length,
    read_records,
    train_and_val,
)
from llm.io import atomic_write_json
from llm.prompts import check_template, format_prompt, render

REQUIRED = ("instruction", "output")

log = logging.getLogger(__name__)


def check_records(rows: Sequence[dict[str, Any]], path: Any) -> None:
    """Every record needs instruction and output (input is optional), all strings."""
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(
                f"{path}: Alpaca record {i} lacks string field(s) {missing} "
                f"(keys found: {sorted(row)}); each record needs instruction, output and an "
                "optional input"
            )


def prompt_text(record: dict[str, Any], template: str | None, tokenizer: Any) -> str:
    """The text a record's response follows. Alpaca has an Input section; the other templates
    take one user message, the input after the instruction."""
    if template == "alpaca":
        return format_prompt(record)
    content = record["instruction"]
    if record.get("input"):
        content += "\n\n" + record["input"]
    return render(template, [{"role": "user", "content": content}], tokenizer)


def encode_example(
    tokenizer: Any, record: dict[str, Any], max_length: int, template: str | None = "alpaca"
) -> tuple[list[int], int]:
    """(prompt + response + eot ids truncated to max_length + 1, prompt length).

    A text the tokenizer cannot encode is named by its file, line and field.
    """
    try:
        prompt = list(tokenizer.encode(prompt_text(record, template, tokenizer)))
    except ValueError as e:
        for key in ("instruction", "input"):  # which field: the template itself encodes
            if key in record:
                encode_field(tokenizer, record, key)
        where = record.get(SOURCE, "a record")  # else what joins them (a "\n\n" before input)
        raise ValueError(f"{where}: its prompt (template {template}) cannot be encoded: {e}") from e
    ids = prompt + encode_field(tokenizer, record, "output") + [tokenizer.eot_id]
    return ids[: max_length + 1], len(prompt)


def check_alpaca_encodes(tokenizer: Any) -> None:
    """The Alpaca template must encode: a char vocabulary fitted on another text may lack its
    characters ('#', ':', ...), which no record could then work around."""
    template = format_prompt({"instruction": "", "input": ""}) + format_prompt(
        {"instruction": "", "input": " "}
    )
    try:
        tokenizer.encode(template)
    except ValueError as e:
        missing = sorted({c for c in template if _fails(tokenizer, c)})
        raise ValueError(
            f"the tokenizer cannot encode the Alpaca prompt template of task=instruct: its "
            f"vocabulary lacks {missing} ({e}). A char-level checkpoint only knows the "
            "characters of its pretraining corpus: pretrain on text that has them, use a "
            "BPE tokenizer (tokenizer=gpt2, or init= Hugging Face weights), or render the "
            "records as plain text (task.template=null)"
        ) from e


def _fails(tokenizer: Any, text: str) -> bool:
    try:
        tokenizer.encode(text)
    except ValueError:
        return True
    return False


def collate(
    batch: Sequence[tuple[list[int], int]], pad_id: int, mask_prompt: bool = True
) -> tuple[Tensor, Tensor]:
    """Shifted (inputs, targets) padded to the longest example.

    Inputs are padded with `pad_id` (eot); targets are -100 on padding and, if `mask_prompt`,
    wherever the *target* token belongs to the prompt. The sequence's own final eot is a real
    target, so the count of kept targets is len(response) + 1.
    """
    length = max(len(ids) for ids, _ in batch) - 1
    x = torch.full((len(batch), length), pad_id, dtype=torch.long)
    y = torch.full((len(batch), length), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(batch):
        seq = torch.tensor(ids, dtype=torch.long)
        x[i, : len(ids) - 1] = seq[:-1]
        y[i, : len(ids) - 1] = seq[1:]
        if mask_prompt:
            y[i, : max(n_prompt - 1, 0)] = -100  # y[j] = ids[j + 1]: prompt until j = n - 2
    return x, y


class InstructDataModule(ExampleSplits, L.LightningDataModule):
    """Alpaca JSON / JSONL -> (inputs, targets) batches; val split by fraction or `val_path`."""

    def __init__(
        self,
        tokenizer: Any,
        path: str,
        val_path: str | None = None,
        val_fraction: float = 0.1,
        max_length: int | None = None,
        block_size: int | None = None,
        batch_size: int = 8,
        mask_prompt: bool = True,
        num_workers: int = 0,
        seed: int = 1337,
        template: str | None = "alpaca",
    ) -> None:
        super().__init__()
        if tokenizer.eot_id is None:
            raise ValueError(
                "instruction finetuning pads and ends responses with <|endoftext|>, but this "
                "tokenizer has none"
            )
        self.tokenizer = tokenizer
        self.path, self.val_path = path, val_path
        self.val_fraction = float(val_fraction)
        self.max_length = example_length(max_length, block_size)
        self.batch_size = int(batch_size)
        self.mask_prompt = bool(mask_prompt)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.template = check_template(template, "task.template", tokenizer)
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.examples: dict[str, list[tuple[list[int], int]]] = {}

    def _read(self, path: str) -> list[dict[str, Any]]:
        rows = read_records(path)
        check_records(rows, path)
        if all(not str(r["output"]).strip() for r in rows):
            raise ValueError(
                f"{path}: every record's output is empty: there is no response to learn from; "
                "fill in the output field"
            )
        return rows

    def prepare_data(self) -> None:
        if self.examples:
            return
        if self.template == "alpaca":
            check_alpaca_encodes(self.tokenizer)
        train, val = train_and_val(
            self.path, self.val_path, self.val_fraction, self.seed, self._read
        )
        self.records, self.examples = {}, {}
        for split, records in (("train", train), ("val", val)):
            encoded = [
                encode_example(self.tokenizer, r, self.max_length, self.template) for r in records
            ]
            keep = [i for i, ex in enumerate(encoded) if self._has_targets(ex)]
            self._report_dropped(split, len(records) - len(keep), len(records), encoded)
            self.records[split] = [records[i] for i in keep]
            self.examples[split] = [encoded[i] for i in keep]

    def _has_targets(self, example: tuple[list[int], int]) -> bool:
        """Whether any response token survives truncation (else the loss over it is 0/0)."""
        ids, n_prompt = example
        return not self.mask_prompt or len(ids) > n_prompt

    def _report_dropped(
        self, split: str, dropped: int, total: int, examples: list[tuple[list[int], int]]
    ) -> None:
        if not dropped:
            return
        longest = max(n for _, n in examples)
        msg = (
            f"{dropped} of {total} {split} records have a prompt of max_length={self.max_length} "
            f"tokens or more (longest: {longest}), which leaves no response token to learn from; "
            "raise data.max_length (up to the model's block_size) or shorten their inputs"
        )
        if dropped == total:
            raise ValueError(msg)
        log.warning("%s; they are left out", msg)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def split_examples(self, split: str) -> list[tuple[list[int], int]]:
        return self.examples.get(split, [])

    def collate_batch(self, batch: Sequence[tuple[list[int], int]]) -> tuple[Tensor, Tensor]:
        return collate(batch, self.tokenizer.eot_id, self.mask_prompt)


@torch.no_grad()
def generate_responses(
    module: Any,
    records: Sequence[dict[str, Any]],
    max_new_tokens: int = 256,
    template: str | None = "alpaca",
) -> list[dict[str, Any]]:
    """Greedy response per record, stopping at end-of-text; prompt (in the template it trained
    with) cropped to fit the context."""
    tok, model = module.tokenizer, module.model
    module.eval()
    device = next(module.parameters()).device
    block = model.config.block_size
    out = []
    for rec in records:
        ids = list(tok.encode(prompt_text(rec, template, tok)))[-(block - 1) :]
        n_new = max(0, min(int(max_new_tokens), block - len(ids)))
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        new: list[int] = []
        if n_new > 0:
            gen = model.generate(idx, n_new, temperature=0.0, stop_token=tok.eot_id)
            new = gen[0, len(ids) :].tolist()
        if tok.eot_id in new:
            new = new[: new.index(tok.eot_id)]
        out.append(
            {
                "instruction": rec["instruction"],
                "input": rec.get("input", ""),
                "output": rec["output"],
                "response": tok.decode(new).strip(),
            }
        )
    return out


def save_responses(
    module: Any, records: Sequence[dict[str, Any]], path: str | os.PathLike[str], **kw: Any
) -> Path:
    """Generate and write responses.json atomically (a killed run leaves no half file)."""
    return atomic_write_json(path, generate_responses(module, records, **kw))
