"""A multiple-choice benchmark in HellaSwag's format, scored without lm-evaluation-harness
(cheap enough to run at every validation).

Each JSONL row holds ``ctx`` (the context), ``endings`` (the candidate continuations) and
``label`` (the index of the right one), HellaSwag's own field names. The model picks the ending
it finds most likely: ``acc`` by the summed log-probability of the ending's tokens, ``acc_norm``
by their mean (per token), as karpathy's hellaswag.py and the nanoGPT successors report it.
An ending is scored with a space before it, as those do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llm.evaluation.scoring import Pair, score_continuations
from llm.model import GPT
from llm.tokenizers import Tokenizer

FIELDS = ("ctx", "endings", "label")


@dataclass(frozen=True)
class Example:
    """One question: its context, the candidate endings and the index of the right one."""

    ctx: str
    endings: list[str]
    label: int


def read_examples(path: str | os.PathLike[str], limit: int | None = None) -> list[Example]:
    """The first ``limit`` rows (all: None) of a JSONL file, each checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f'{path}: no such file (a JSONL file of {{"ctx", "endings", "label"}} rows, '
            "e.g. HellaSwag's hellaswag_val.jsonl)"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (null: every row), got {limit}")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                examples.append(_example(line, f"{path}:{line_no}"))
    if not examples:
        raise ValueError(f"{path} holds no rows: nothing to score")
    return examples


def _example(line: str, where: str) -> Example:
    hint = 'each line must be {"ctx": str, "endings": [str, ...], "label": int}'
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg}); {hint}") from e
    if not isinstance(row, dict) or any(k not in row for k in FIELDS):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: needs the fields {list(FIELDS)}, found {found}; {hint}")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str):
        raise ValueError(f"{where}: ctx must be a string, got {type(ctx).__name__}; {hint}")
    if (
        not isinstance(endings, list)
        or len(endings) < 2
        or not all(isinstance(e, str) and e for e in endings)
    ):
        raise ValueError(f"{where}: endings must be a list of 2 or more non-empty strings; {hint}")
    if isinstance(label, str) and label.strip().isdigit():  # the Hub's copy stores "3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ValueError(
            f"{where}: label must be an index into the {len(endings)} endings, got {label!r}"
        )
    return Example(ctx, list(endings), label)


def encode_examples(tokenizer: Tokenizer, examples: Sequence[Example]) -> list[list[Pair]]:
    """Per example, one (context ids, ending ids) pair per ending; an empty context starts
    from end-of-text."""
    encoded = []
    for ex in examples:
        ctx = tokenizer.encode(ex.ctx)
        if not ctx:
            if tokenizer.eot_id is None:
                raise ValueError("an empty ctx needs an end-of-text token to start from")
            ctx = [tokenizer.eot_id]
        encoded.append([(ctx, tokenizer.encode(" " + ending)) for ending in ex.endings])
    return encoded


def score_examples(
    model: GPT, encoded: Sequence[Sequence[Pair]], labels: Sequence[int], batch_size: int = 16
) -> tuple[int, int]:
    """How many examples the model gets right by summed (acc) and by per-token mean
    (acc_norm) log-probability of the endings."""
    pairs = [pair for pairs in encoded for pair in pairs]
    scores = iter(score_continuations(model, pairs, batch_size))
    correct = correct_norm = 0
    for pairs, label in zip(encoded, labels, strict=True):
        row = [next(scores) for _ in pairs]
        total = [s.logprob for s in row]
        mean = [s.logprob / s.tokens for s in row]
        correct += int(total.index(max(total)) == label)
        correct_norm += int(mean.index(max(mean)) == label)
    return correct, correct_norm


def evaluate_multiple_choice(
    model: GPT, tokenizer: Tokenizer, examples: Sequence[Example], batch_size: int = 16
) -> dict[str, float]:
    """``acc`` and ``acc_norm`` over ``examples`` (and their count ``n``)."""
    encoded = encode_examples(tokenizer, examples)
    correct, correct_norm = score_examples(
        model, encoded, [ex.label for ex in examples], batch_size
    )
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": float(n)}
