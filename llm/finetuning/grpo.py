"""Reinforcement learning with verifiable rewards: GRPO (Shao et al. 2024, DeepSeekMath).

Each step samples ``group_size`` completions of every prompt (one batched generation per
prompt, with the KV cache), scores them with the reward function (``reward=``), normalises the
rewards within each group (the advantages: no value model), and takes a clipped policy-gradient
step, with an optional KL penalty to the frozen initial policy (``kl_coef``, 0 allowed).

The loss averages over every completion token of the batch (DAPO's token-level mean: a long
completion weighs by its tokens, not as one sequence). One optimizer step per batch of
completions, so the probability ratio is 1 and the clip is inactive in value: it is written out
so the objective is the one of the papers. Validation decodes each held-out prompt greedily and
logs the mean reward and the accuracy; ``val/loss`` is minus the mean reward, so what minimises
val/loss (best checkpoint, sweeps, ``llm report``) keeps the most rewarded weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from llm.finetuning.logprobs import IGNORE, token_logps
from llm.finetuning.policy import PolicyModule
from llm.finetuning.records import SOURCE, ExampleSplits, read_records, train_and_val
from llm.prompts import render

log = logging.getLogger(__name__)

Reward = Callable[[str, str, dict[str, Any]], float]


# -- prompts -----------------------------------------------------------------------------
def check_prompt_records(rows: Sequence[dict[str, Any]], path: Any) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            found = sorted(k for k in row if k != SOURCE)
            where = row.get(SOURCE, f"{path} record {i}")
            raise ValueError(
                f"{where}: a prompt record needs a string field 'prompt' (fields found: {found}); "
                "add 'answer' for the exact-match rewards"
            )


class PromptDataModule(ExampleSplits, L.LightningDataModule):
    """Prompts (JSON / JSONL records ``{prompt, answer, ...}``, or generated arithmetic
    problems with ``generator=arithmetic``) -> batches of encoded prompts and their records.
    The held-out split (``val_path``, ``val_fraction``, or the generator's) is never trained on.
    """

    def __init__(
        self,
        tokenizer: Any,
        path: str | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.1,
        generator: str | None = None,
        max_operand: int = 30,
        ops: str = "+*",
        held_out: float = 0.1,
        reverse: bool = False,
        val_limit: int | None = None,
        block_size: int | None = None,
        batch_size: int = 8,
        template: str | None = None,
        num_workers: int = 0,
        seed: int = 1337,
    ) -> None:
        super().__init__()
        if tokenizer.eot_id is None:
            raise ValueError("RL completions stop at <|endoftext|>, which this tokenizer lacks")
        if (path is None) == (generator is None):
            raise ValueError("set one of data.path (a JSONL of prompts) or data.generator")
        if generator not in (None, "arithmetic"):
            raise ValueError(f"data.generator={generator!r}: the generator is 'arithmetic'")
        self.tokenizer = tokenizer
        self.path, self.val_path, self.val_fraction = path, val_path, float(val_fraction)
        self.generator = generator
        self.arithmetic = {
            "max_operand": int(max_operand),
            "ops": str(ops),
            "held_out": float(held_out),
            "reverse": bool(reverse),
        }
        self.val_limit = val_limit
        self.block_size = block_size
        self.batch_size = int(batch_size)
        self.template = template
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.examples: dict[str, list[dict[str, Any]]] = {}

    def _records(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self.generator == "arithmetic":
            from llm.finetuning.arithmetic import problems

            train, val = problems(**self.arithmetic)
            return [p.record() for p in train], [p.record() for p in val]
        assert self.path is not None
        return train_and_val(self.path, self.val_path, self.val_fraction, self.seed, self._read)

    @staticmethod
    def _read(path: str) -> list[dict[str, Any]]:
        rows = read_records(path)
        check_prompt_records(rows, path)
        return rows

    def prepare_data(self) -> None:
        if self.examples:
            return
        train, val = self._records()
        if self.val_limit is not None:
            val = val[: int(self.val_limit)]
        for split, records in (("train", train), ("val", val)):
            self.examples[split] = [self._encode(r) for r in records]

    def _encode(self, record: dict[str, Any]) -> dict[str, Any]:
        messages = [{"role": "user", "content": record["prompt"]}]
        where = record.get(SOURCE, repr(record["prompt"]))
        try:
            ids = list(self.tokenizer.encode(render(self.template, messages, self.tokenizer)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if self.block_size is not None and len(ids) >= int(self.block_size):
            raise ValueError(
                f"{where}: the prompt is {len(ids)} tokens, no room left in the model's context "
                f"of {self.block_size} for a completion; shorten it"
            )
        return {"ids": ids, "record": record}

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def split_examples(self, split: str) -> list[dict[str, Any]]:
        return self.examples.get(split, [])

    def collate_batch(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(batch)  # prompts of any length: the step samples each one's group


# -- the objective -----------------------------------------------------------------------
def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(r - mean) / (std + eps) within each group of ``group_size`` consecutive rewards (the
    sample std, as GRPO and TRL take it); a group whose rewards are all equal gets zeros."""
    grouped = rewards.view(-1, group_size)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    reference_logps: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """The clipped surrogate plus ``kl_coef`` times the k3 estimate of KL(policy || reference),
    averaged over the completion tokens (``mask``); returns (loss, mean KL or None)."""
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = None
    n = mask.sum().clamp(min=1)
    if reference_logps is not None:
        d = reference_logps - logps
        k3 = torch.exp(d) - d - 1
        kl = (k3 * mask).sum() / n
        per_token = per_token + kl_coef * k3
    return (per_token * mask).sum() / n, kl


def check_rl(settings: dict[str, Any]) -> dict[str, Any]:
    """GRPO's settings, checked and plain."""
    from llm import checks

    group = checks.integer("task.group_size", settings.get("group_size", 8), minimum=2, example=8)
    out = {
        "group_size": group,
        "temperature": checks.number(
            "task.temperature", settings.get("temperature", 1.0), above=0.0, example=1.0
        ),
        "top_k": settings.get("top_k"),
        "max_new_tokens": checks.integer(
            "task.max_new_tokens", settings.get("max_new_tokens", 32), minimum=1, example=32
        ),
        "kl_coef": checks.number(
            "task.kl_coef", settings.get("kl_coef", 0.0), minimum=0.0, example=0.0
        ),
        "clip_eps": checks.number(
            "task.clip_eps", settings.get("clip_eps", 0.2), above=0.0, example=0.2
        ),
        "success": checks.number("task.success", settings.get("success", 1.0), example=1.0),
        "reward": settings.get("reward") or {},
    }
    if out["top_k"] is not None:
        out["top_k"] = checks.integer("task.top_k", out["top_k"], minimum=1, example=50)
    if not isinstance(out["reward"], dict) or "_target_" not in out["reward"]:
        raise ValueError("the RL task needs a reward: reward=exact_match (or arithmetic, ...)")
    return out


def build_reward(settings: dict[str, Any]) -> Reward:
    """The reward function a ``reward`` config names (its keyword settings bound)."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        fn = hydra.utils.instantiate({**settings, "_partial_": True})
    except InstantiationException as e:
        raise ValueError(
            f"reward._target_={settings.get('_target_')}: not a function that can be imported "
            f"with these settings ({str(e).splitlines()[0]}); name one as module.function, "
            "with its module importable"
        ) from e
    if not callable(fn):
        raise ValueError(f"reward._target_={settings.get('_target_')} is not a function")
    return fn


def score(reward: Reward, prompt: str, completion: str, record: dict[str, Any]) -> float:
    """One reward, as a finite float; one that raises or is not a finite number names the
    record rather than becoming a silent zero gradient."""
    where = record.get(SOURCE, repr(record.get("prompt")))
    try:
        value = reward(prompt, completion, record)
    except Exception as e:
        raise ValueError(
            f"the reward function failed on {where} (completion {completion!r}): "
            f"{type(e).__name__}: {e}"
        ) from e
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"the reward function returned {value!r} for {where} (completion {completion!r}); "
            "a reward is a finite number"
        )
    return float(value)


# -- the module --------------------------------------------------------------------------
class GRPOModule(PolicyModule):
    """GRPO on the GPT (settings under ``rl``: group size, sampling, KL, clip, reward)."""

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        compile: bool = False,
        sample: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        template: str | None = None,
        rl: dict[str, Any] | None = None,
    ) -> None:
        settings = check_rl(rl or {})
        super().__init__(model, tokenizer, optim, compile, sample, lora, template, rl=settings)
        self.rl = settings
        self.reward = build_reward(settings["reward"])
        self._val: list[tuple[float, int]] = []
        self._shown: list[str] = []

    def _completion(self, new: list[int]) -> tuple[list[int], str]:
        """(the scored ids: up to and with the first eot, the text before it)."""
        eot = self.tokenizer.eot_id
        end = new.index(eot) + 1 if eot in new else len(new)
        return new[:end], self.tokenizer.decode(new[: end - 1 if eot in new[:end] else end])

    @torch.no_grad()
    def sample_group(self, ids: list[int], n: int, greedy: bool = False) -> list[list[int]]:
        """``n`` completions of one prompt, one batched generation with the KV cache."""
        room = self.config.block_size - len(ids)
        idx = torch.tensor([ids] * n, dtype=torch.long, device=self.device)
        was = self.model.training
        self.model.eval()
        out = self.model.generate(
            idx,
            min(self.rl["max_new_tokens"], room),
            temperature=0.0 if greedy else self.rl["temperature"],
            top_k=self.rl["top_k"],
            stop_token=self.tokenizer.eot_id,
        )
        self.model.train(was)
        return [row[len(ids) :] for row in out.tolist()]

    def rollout(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Sample and score each prompt's group; the rows to train on as tensors."""
        g = self.rl["group_size"]
        rows, prompts, rewards, lengths = [], [], [], []
        for example in batch:
            text = example["record"]["prompt"]
            for new in self.sample_group(example["ids"], g):
                ids, completion = self._completion(new)
                rows.append((example["ids"], ids))
                prompts.append(len(example["ids"]))
                rewards.append(score(self.reward, text, completion, example["record"]))
                lengths.append(len(ids))
        length = max(len(p) + len(c) for p, c in rows) - 1
        x = torch.full((len(rows), length), self.tokenizer.eot_id, dtype=torch.long)
        y = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        for i, (prompt, completion) in enumerate(rows):
            seq = torch.tensor(prompt + completion, dtype=torch.long)
            x[i, : len(seq) - 1] = seq[:-1]
            y[i, len(prompt) - 1 : len(seq) - 1] = seq[len(prompt) :]
        r = torch.tensor(rewards, dtype=torch.float32)
        spread = r.view(-1, g).std(1)
        return {
            "x": x.to(self.device),
            "y": y.to(self.device),
            "rewards": r,
            "advantages": group_advantages(r, g).to(self.device),
            "lengths": torch.tensor(lengths, dtype=torch.float32),
            "flat_groups": (spread == 0).float().mean(),
        }

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> Tensor:
        roll = self.rollout(batch)
        x, y = roll["x"], roll["y"]
        logps = token_logps(self.network(x)[0], y)
        mask = (y != IGNORE).float()
        reference = None
        if self.rl["kl_coef"] > 0:
            reference = token_logps(self.reference_logits(x), y)
        loss, kl = grpo_loss(
            logps,
            logps.detach(),
            roll["advantages"],
            mask,
            self.rl["clip_eps"],
            reference,
            self.rl["kl_coef"],
        )
        if self.logging_step():
            metrics = {
                "train/loss": loss,
                "train/reward": roll["rewards"].mean(),
                "train/reward_std": roll["rewards"].std(),
                "train/completion_tokens": roll["lengths"].mean(),
                "train/flat_groups": roll["flat_groups"],
            }
            if kl is not None:
                metrics["train/kl"] = kl
            self.log_train(metrics)
        return loss

    # -- validation: greedy completions of the held-out prompts -----------------------------
    def on_validation_epoch_start(self) -> None:
        self._val, self._shown = [], []

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        for example in batch:
            record = example["record"]
            (new,) = self.sample_group(example["ids"], 1, greedy=True)
            ids, completion = self._completion(new)
            value = score(self.reward, record["prompt"], completion, record)
            self._val.append((value, len(ids)))
            if len(self._shown) < 8:
                self._shown.append(f"| `{record['prompt']}` | `{completion}` | {value:g} |")

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        values = torch.tensor([v for v, _ in self._val], device=self.device)
        lengths = torch.tensor([n for _, n in self._val], dtype=torch.float32, device=self.device)
        solved = (values >= self.rl["success"]).float()
        stats = torch.stack(
            [values.sum(), solved.sum(), lengths.sum(), values.new_tensor(float(len(values)))]
        )
        stats = self.all_gather(stats).view(-1, 4).sum(0)
        n = stats[3].clamp(min=1)
        means = {
            "val/loss": -stats[0] / n,
            "val/reward": stats[0] / n,
            "val/accuracy": stats[1] / n,
            "val/completion_tokens": stats[2] / n,
        }
        self._write_samples()
        if self.trainer.sanity_checking:
            self.log_initial_validation(means)
            return
        for key, value in means.items():
            self.log(key, value, prog_bar=key in ("val/reward", "val/accuracy"), sync_dist=True)
        if self.trainer.state.fn == "fit":
            self.log("step", float(self.global_step), sync_dist=True)

    def _write_samples(self) -> None:
        """A few held-out prompts with their greedy completions and rewards, in TEXT."""
        from llm.training.board import write_text, writers

        if not self.trainer.is_global_zero or not self._shown:
            return
        table = "| prompt | completion | reward |\n|---|---|---|\n" + "\n".join(self._shown)
        for writer in writers(self.loggers):
            write_text(writer, "completions", table, self.global_step)
