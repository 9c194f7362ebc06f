"""Preference tuning (DPO, Rafailov et al. 2023; IPO, Azar et al. 2023): from records of a
prompt with a chosen and a rejected response, raise the policy's log-probability ratio of the
chosen response over the rejected one relative to a frozen reference (the initial policy).

Records are ``{prompt, chosen, rejected}`` with strings, or the chat form where ``prompt`` is a
list of messages and ``chosen``/``rejected`` are lists of assistant messages (TRL's
conversational format). Each is rendered with the model's prompt template (:mod:`llm.prompts`;
None: a base model reads prompt + response as plain text); the loss reads the response tokens
(and the end-of-text that closes them) only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from llm.finetuning.logprobs import IGNORE, token_kl, token_logps
from llm.finetuning.policy import PolicyModule
from llm.finetuning.records import (
    SOURCE,
    ExampleSplits,
    example_length,
    read_records,
    train_and_val,
)
from llm.prompts import render

log = logging.getLogger(__name__)

LOSSES = ("sigmoid", "ipo")
METRICS = ("reward_acc", "margin", "chosen_reward", "rejected_reward")


# -- records -----------------------------------------------------------------------------
def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {field!r} must be a string or a list of messages")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise ValueError(f"{where}: field {field!r} holds {m!r}, not a message {{role, ...}}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: field {field!r} has a message without string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The prompt as a conversation that ends with the user's message."""
    where, prompt = record.get(SOURCE, "a record"), record["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = _messages(prompt, where, "prompt")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt's last message must be the user's")
    return messages


def response_text(record: dict[str, Any], field: str) -> str:
    """A response field as text: a string, or the content of its assistant messages."""
    value, where = record[field], record.get(SOURCE, "a record")
    if isinstance(value, str):
        return value
    messages = _messages(value, where, field)
    if any(m["role"] != "assistant" for m in messages):
        raise ValueError(f"{where}: field {field!r} must hold assistant messages only")
    return "".join(m["content"] for m in messages)


def check_pair_records(rows: Sequence[dict[str, Any]], path: Any) -> None:
    """Every record needs a prompt and both responses, the responses different (a pair
    whose responses are the same teaches nothing and has a zero gradient). An empty response
    string is a response (the model stopping at once: end-of-text alone), not a missing one."""
    for i, row in enumerate(rows):
        where = row.get(SOURCE, f"{path} record {i}")
        missing = [
            k
            for k in ("prompt", "chosen", "rejected")
            if row.get(k) is None or row[k] == [] or (k == "prompt" and row[k] == "")
        ]
        if missing:
            found = sorted(k for k in row if k != SOURCE)
            raise ValueError(
                f"{where}: a preference record lacks {missing} (fields found: {found}); each "
                "needs prompt, chosen and rejected"
            )
        prompt_messages(row)
        if response_text(row, "chosen") == response_text(row, "rejected"):
            raise ValueError(f"{where}: chosen and rejected are the same response")


@dataclass
class Pair:
    """One encoded record: prompt + response ids (with eot) of each side, the prompt length,
    and the reference's summed log-probs of the two responses once precomputed."""

    chosen: list[int]
    rejected: list[int]
    n_prompt: int
    reference: tuple[float, float] | None = None


def encode_pair(
    tokenizer: Any, record: dict[str, Any], template: str | None, max_length: int
) -> Pair:
    """Prompt and responses with the template, each side cut to ``max_length + 1`` ids."""
    where = record.get(SOURCE, "a record")
    try:
        prompt = list(tokenizer.encode(render(template, prompt_messages(record), tokenizer)))
        sides = [
            [*tokenizer.encode(response_text(record, k)), tokenizer.eot_id]
            for k in ("chosen", "rejected")
        ]
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    cut = max_length + 1
    return Pair((prompt + sides[0])[:cut], (prompt + sides[1])[:cut], len(prompt))


def collate_pairs(batch: Sequence[Pair], pad_id: int) -> dict[str, Tensor]:
    """(2B, T) inputs and targets, chosen rows first then rejected, targets IGNORE on the
    prompt and the padding; ``reference`` (B, 2) when precomputed."""
    rows = [p.chosen for p in batch] + [p.rejected for p in batch]
    prompts = [p.n_prompt for p in batch] * 2
    length = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), length), pad_id, dtype=torch.long)
    y = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(zip(rows, prompts, strict=True)):
        seq = torch.tensor(ids, dtype=torch.long)
        x[i, : len(ids) - 1] = seq[:-1]
        y[i, : len(ids) - 1] = seq[1:]
        y[i, : max(n_prompt - 1, 0)] = IGNORE  # y[j] = ids[j + 1]: the prompt until j = n - 2
    out = {"x": x, "y": y}
    if all(p.reference is not None for p in batch):
        out["reference"] = torch.tensor([p.reference for p in batch], dtype=torch.float32)
    return out


class PreferenceDataModule(ExampleSplits, L.LightningDataModule):
    """Preference JSON / JSONL (or CSV with string fields) -> pair batches; val split by
    fraction or ``val_path``. ``template`` is set by the task from the model it tunes."""

    def __init__(
        self,
        tokenizer: Any,
        path: str,
        val_path: str | None = None,
        val_fraction: float = 0.1,
        max_length: int | None = None,
        block_size: int | None = None,
        batch_size: int = 8,
        template: str | None = None,
        num_workers: int = 0,
        seed: int = 1337,
    ) -> None:
        super().__init__()
        if tokenizer.eot_id is None:
            raise ValueError(
                "preference tuning ends each response with <|endoftext|>, which "
                "this tokenizer lacks"
            )
        self.tokenizer = tokenizer
        self.path, self.val_path = path, val_path
        self.val_fraction = float(val_fraction)
        self.max_length = example_length(max_length, block_size)
        self.batch_size = int(batch_size)
        self.template = template
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pairs: dict[str, list[Pair]] = {}

    def _read(self, path: str) -> list[dict[str, Any]]:
        rows = read_records(path)
        check_pair_records(rows, path)
        return rows

    def prepare_data(self) -> None:
        if self.pairs:
            return
        train, val = train_and_val(
            self.path, self.val_path, self.val_fraction, self.seed, self._read
        )
        for split, records in (("train", train), ("val", val)):
            pairs = [
                encode_pair(self.tokenizer, r, self.template, self.max_length) for r in records
            ]
            kept = [p for p in pairs if min(len(p.chosen), len(p.rejected)) > p.n_prompt]
            if len(kept) < len(pairs):
                msg = (
                    f"{len(pairs) - len(kept)} of {len(pairs)} {split} records have a prompt of "
                    f"data.max_length={self.max_length} tokens or more: no response token is "
                    "left to compare; raise data.max_length or shorten their prompts"
                )
                if not kept:
                    raise ValueError(msg)
                log.warning("%s; they are left out", msg)
            self.pairs[split] = kept

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def split_examples(self, split: str) -> list[Pair]:
        return self.pairs.get(split, [])

    def collate_batch(self, batch: Sequence[Pair]) -> dict[str, Tensor]:
        return collate_pairs(batch, self.tokenizer.eot_id)


# -- the objective -----------------------------------------------------------------------
def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The per-pair DPO loss (mean) from the responses' log-probs, and its diagnostics.

    sigmoid: -log sigmoid(beta h), h = (pi_c - pi_r) - (ref_c - ref_r); with label smoothing
    eps (conservative DPO) -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    ipo: (h - 1 / (2 beta))^2, on log-probs averaged per token (the caller's choice).
    Rewards are beta (pi - ref) of each response; accuracy counts a tie as half, so the
    untrained policy (all rewards 0) scores 0.5, the chance it stands for.
    """
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss == "sigmoid":
        losses = (
            -F.logsigmoid(beta * h) * (1 - label_smoothing)
            - F.logsigmoid(-beta * h) * label_smoothing
        )
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"task.loss={loss!r}: use one of {list(LOSSES)}")
    chosen = beta * (policy_chosen - reference_chosen).detach()
    rejected = beta * (policy_rejected - reference_rejected).detach()
    won = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    stats = {
        "reward_acc": won.mean(),
        "margin": (chosen - rejected).mean(),
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
    }
    return losses.mean(), stats


class PreferenceModule(PolicyModule):
    """DPO on the GPT (its settings under ``preference``), against the frozen initial policy."""

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        compile: bool = False,
        sample: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        template: str | None = None,
        preference: dict[str, Any] | None = None,
    ) -> None:
        settings = check_preference(preference or {})
        super().__init__(
            model, tokenizer, optim, compile, sample, lora, template, preference=settings
        )
        self.beta = float(settings["beta"])
        self.loss_type = str(settings["loss"])
        self.label_smoothing = float(settings["label_smoothing"])
        self._val: dict[str, list[Tensor]] = {}

    def response_logps(self, logits: Tensor, y: Tensor) -> Tensor:
        """(2B,) each row's response log-prob under ``logits``: summed for DPO, averaged per
        token for IPO (which compares per-token averages)."""
        summed, count = token_logps(logits, y).sum(-1), (y != IGNORE).sum(-1)
        return summed / count.clamp(min=1) if self.loss_type == "ipo" else summed

    # -- steps ---------------------------------------------------------------------------
    def _step(
        self, batch: dict[str, Tensor], reference_logits: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(loss, diagnostics, the policy's logits); the reference's log-probs from the batch
        when precomputed, else from ``reference_logits`` (computed here when not given)."""
        x, y = batch["x"], batch["y"]
        logits = self.network(x)[0]
        policy = self.response_logps(logits, y)
        if "reference" in batch:
            reference = batch["reference"].to(policy).t().reshape(-1)  # chosen..., rejected...
        else:
            if reference_logits is None:
                reference_logits = self.reference_logits(x)
            reference = self.response_logps(reference_logits, y)
        b = x.size(0) // 2
        loss, stats = preference_loss(
            policy[:b],
            policy[b:],
            reference[:b],
            reference[b:],
            self.beta,
            self.loss_type,
            self.label_smoothing,
        )
        return loss, stats, logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, stats, _ = self._step(batch)
        if self.logging_step():
            self.log_train({"train/loss": loss, **{f"train/{k}": v for k, v in stats.items()}})
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        reference_logits = self.reference_logits(batch["x"])  # one pass: the loss and the KL
        loss, stats, logits = self._step(batch, reference_logits)
        kl = token_kl(logits, reference_logits, batch["y"])
        for key, value in {"loss": loss, **stats, "kl": kl}.items():
            self._val.setdefault(key, []).append(value.detach().float())
        return loss

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        means = {
            f"val/{k}": self.all_gather(torch.stack(v).mean()).float().mean()
            for k, v in self._val.items()
        }
        self._val = {}
        if self.trainer.sanity_checking:
            self.log_initial_validation(means)
            return
        for key, value in means.items():
            self.log(key, value, prog_bar=key in ("val/loss", "val/reward_acc"), sync_dist=True)
        if self.trainer.state.fn == "fit":
            self.log("step", float(self.global_step), sync_dist=True)

    def on_fit_start(self) -> None:
        """Precompute the reference's log-probs once per pair (``precompute_ref``): the
        reference forward leaves every step. The reference is the init weights whatever the
        policy's state, so a resumed run computes the same numbers."""
        if not self.hparams["preference"]["precompute_ref"]:
            return
        dm = self.trainer.datamodule
        for pairs in dm.pairs.values():
            missing = [p for p in pairs if p.reference is None]
            for start in range(0, len(missing), dm.batch_size):
                chunk = missing[start : start + dm.batch_size]
                batch = collate_pairs(chunk, dm.tokenizer.eot_id)
                x, y = batch["x"].to(self.device), batch["y"].to(self.device)
                ref = self.response_logps(self.reference_logits(x), y)
                b = len(chunk)
                for p, c, r in zip(chunk, ref[:b].tolist(), ref[b:].tolist(), strict=True):
                    p.reference = (c, r)


def check_preference(settings: dict[str, Any]) -> dict[str, Any]:
    """The task's settings, checked and plain: beta > 0, a known loss, label smoothing in
    [0, 0.5)."""
    from llm import checks

    out = {
        "beta": settings.get("beta", 0.1),
        "loss": settings.get("loss", "sigmoid"),
        "label_smoothing": settings.get("label_smoothing", 0.0),
        "precompute_ref": bool(settings.get("precompute_ref", False)),
    }
    beta = checks.number("task.beta", out["beta"], above=0.0, example=0.1)
    checks.choice("task.loss", out["loss"], LOSSES)
    smoothing = checks.number(
        "task.label_smoothing", out["label_smoothing"], minimum=0.0, below=0.5, example=0.1
    )
    return {**out, "beta": beta, "label_smoothing": smoothing}
