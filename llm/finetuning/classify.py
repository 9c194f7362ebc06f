"""Sequence classification: a linear head on the GPT's last real token (LLMs-from-scratch ch. 6).

Under causal attention the last non-padding token is the only one that has seen the whole
text, so its final hidden state summarises it; right padding never leaks into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from llm.finetuning.records import (
    SOURCE,
    ExampleSplits,
    encode_field,
    read_records,
    require_columns,
    split_records,
)
from llm.model import GPT
from llm.training.task import TaskModule


def freeze_for_classification(model: GPT, trainable_layers: int | None) -> None:
    """Train only the last N blocks + final norm (the head is always trained); None: all."""
    if trainable_layers is None:
        return
    n = int(trainable_layers)
    if not 0 <= n <= model.config.n_layer:
        raise ValueError(
            f"trainable_layers={n} must be in [0, n_layer={model.config.n_layer}] or null"
        )
    model.requires_grad_(False)
    for module in model.top_layers(n):
        module.requires_grad_(True)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids truncated to `max_length` (keeping the start); empty text -> [eot]."""
    out = []
    for t in texts:
        ids = list(tokenizer.encode(str(t)))[:max_length]
        out.append(ids or [tokenizer.eot_id or 0])
    return out


def pad_batch(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad to `length`: (ids (B, length), lengths (B,))."""
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


class ClassificationDataModule(ExampleSplits, L.LightningDataModule):
    """Text/label files -> padded (ids, lengths, label) batches; labels vocab from the data.

    `path` is split into train/val/test by fraction unless `val_path` / `test_path` are given.
    Every sequence is truncated and right-padded (with eot) to `max_length`.
    """

    def __init__(
        self,
        tokenizer: Any,
        path: str,
        text_column: str = "text",
        label_column: str = "label",
        format: str = "auto",
        max_length: int | None = None,
        block_size: int | None = None,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        val_path: str | None = None,
        test_path: str | None = None,
        labels: list[str] | None = None,
        num_workers: int = 0,
        seed: int = 1337,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.path, self.val_path, self.test_path = path, val_path, test_path
        self.text_column, self.label_column = text_column, label_column
        self.format = format
        self.block_size = None if block_size is None else int(block_size)
        self.max_length = None if max_length is None else int(max_length)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction) if val_path is None else 0.0
        self.test_fraction = float(test_fraction) if test_path is None else 0.0
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        self.labels: list[str] | None = [str(x) for x in labels] if labels else None
        self.splits: dict[str, list[tuple[list[int], int]]] = {}
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be > 0 or null, got {max_length}")
        if self.max_length and self.block_size and self.max_length > self.block_size:
            raise ValueError(
                f"data.max_length={self.max_length} > the model's block_size {self.block_size}; "
                "lower max_length"
            )

    def _read(self, path: str) -> list[dict[str, Any]]:
        rows = read_records(path, self.format)
        require_columns(
            rows,
            [self.text_column, self.label_column],
            path,
            " ; set data.text_column= / data.label_column= to the right names",
        )
        for row in rows:  # an empty cell would become a class of its own, named ''
            if not str(row[self.label_column]).strip():
                raise ValueError(
                    f"{row.get(SOURCE, path)}: the label (column {self.label_column!r}) is "
                    "empty; give that row its label, or delete the row"
                )
        return rows

    def prepare_data(self) -> None:
        """Read, split and tokenize once (small files); fixes `self.labels`."""
        if self.splits:
            return
        rows = self._read(self.path)
        train, val, test = split_records(rows, [self.val_fraction, self.test_fraction], self.seed)
        if self.val_path:
            val = self._read(self.val_path)
        if self.test_path:
            test = self._read(self.test_path)
        if self.labels is None:
            self.labels = sorted({str(r[self.label_column]) for r in train})
        if len(self.labels) < 2:
            raise ValueError(f"{self.path}: need at least 2 distinct labels, got {self.labels}")
        encoded = {  # each text once, errors named by file and line
            id(r): encode_field(self.tokenizer, r, self.text_column) for r in [*train, *val, *test]
        }
        if self.max_length is None:  # longest training text, as LLMs-from-scratch pads
            longest = max(len(encoded[id(r)]) for r in train)
            self.max_length = min(longest, self.block_size or longest)
        index = {lab: i for i, lab in enumerate(self.labels)}
        for name, part in (("train", train), ("val", val), ("test", test)):
            unknown = sorted({str(r[self.label_column]) for r in part} - set(index))
            if unknown:
                raise ValueError(
                    f"{name} split has labels {unknown} not among the training labels "
                    f"{self.labels}; add examples or set data.labels"
                )
            pad = [self.tokenizer.eot_id or 0]  # an empty text: the eot token alone
            self.splits[name] = [
                (encoded[id(r)][: self.max_length] or pad, index[str(r[self.label_column])])
                for r in part
            ]

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def collate_batch(self, batch: list[tuple[list[int], int]]) -> tuple[Tensor, Tensor, Tensor]:
        assert self.max_length is not None, "call prepare_data() first"
        ids, lengths = pad_batch([s for s, _ in batch], self.max_length, self.pad_id)
        return ids, lengths, torch.tensor([y for _, y in batch], dtype=torch.long)

    def split_examples(self, split: str) -> list[tuple[list[int], int]]:
        return self.splits.get(split, [])

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")


class ClassifierModule(TaskModule):
    """GPT body + `head: n_embd -> len(labels)`; logs loss and accuracy on train/val/test.

    Extra hparams (all plain): labels, max_length, trainable_layers (None: all train; N: last
    N blocks + final norm + head) and lora (only adapters + head train).
    """

    kind = "classifier"
    gpt_entry_points = ("hidden_states",)  # called instead of forward (llm.training.sharding)

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        compile: bool = False,
        lora: dict[str, Any] | None = None,
        labels: list[str] | None = None,
        max_length: int = 128,
        trainable_layers: int | None = None,
    ) -> None:
        if not labels or len(labels) < 2:
            raise ValueError(f"classification needs at least 2 labels, got {labels}")
        super().__init__(
            model,
            tokenizer,
            optim,
            compile,
            lora,
            labels=[str(x) for x in labels],
            max_length=int(max_length),
            trainable_layers=None if trainable_layers is None else int(trainable_layers),
        )
        self.labels = list(self.hparams["labels"])
        self.head = nn.Linear(self.config.n_embd, len(self.labels))
        if not lora:  # LoRA froze every base weight already
            freeze_for_classification(self.model, trainable_layers)
        n = len(self.labels)
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self._val_losses: list[Tensor] = []

    def optimized(self) -> nn.Module:
        return self  # the body *and* the head (frozen parameters are skipped)

    def classify(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits (B, n_labels) from the hidden state at position lengths - 1."""
        h = self.model.hidden_states(idx)
        if lengths is None:
            return self.head(h[:, -1])
        last = (lengths - 1).clamp(min=0)
        return self.head(h[torch.arange(h.size(0), device=h.device), last])

    def forward(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.classify(idx, lengths)

    def _loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        ids, lengths, y = batch
        logits = self.classify(ids, lengths)
        return F.cross_entropy(logits.float(), y), logits.argmax(-1), y

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, predicted, y = self._loss(batch)
        if self.logging_step():  # the batch's accuracy; no host sync on other steps
            self.log_train({"train/loss": loss, "train/acc": (predicted == y).float().mean()})
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> Tensor:
        loss, predicted, y = self._loss(batch)
        acc = getattr(self, f"{stage}_acc")
        acc(predicted, y)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._evaluate(batch, "val")
        self._val_losses.append(loss.detach().float())
        return loss

    def on_validation_epoch_end(self) -> None:
        """Metrics are epoch-reduced by ``self.log``; the check before the first step, which
        Lightning does not log, is logged as step 0 here."""
        losses, self._val_losses = self._val_losses, []
        if self.trainer.sanity_checking and losses:
            loss = self.all_gather(torch.stack(losses).mean()).float().mean()
            self.log_initial_validation({"val/loss": loss, "val/acc": self.val_acc.compute()})

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    @torch.no_grad()
    def predict_texts(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(label, probability) per text, truncated like training."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer; it cannot encode text")
        self.eval()
        seqs = encode_texts(self.tokenizer, texts, self.hparams["max_length"])
        pad = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        ids, lengths = pad_batch(seqs, max(len(s) for s in seqs), pad)
        probs = torch.softmax(self.classify(ids.to(self.device), lengths.to(self.device)), -1)
        conf, idx = probs.max(-1)
        pairs = zip(idx.tolist(), conf.tolist(), strict=True)
        return [(self.labels[i], float(c)) for i, c in pairs]
