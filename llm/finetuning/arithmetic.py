"""Arithmetic problems (``a+b=``, ``a*b=``) for the post-training ladder: every problem of the
given operands enumerated, shuffled once with a fixed seed and cut into a held-out part that no
stage trains on (pretraining text, instructions, preference pairs or RL prompts) and the rest.

``reverse=True`` writes each answer least-significant digit first (``57+68=521``), the order in
which a carry flows: a small transformer then learns the addition algorithm and generalises to
problems it never saw, where with the usual order it memorises (Lee et al. 2023, *Teaching
arithmetic to small transformers*; measured in docs/post_training.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

OPS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b, "-": lambda a, b: a - b}


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int
    reverse: bool = False

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return int(OPS[self.op](self.a, self.b))

    @property
    def text(self) -> str:
        """The answer as the model writes it."""
        return self.write(self.answer)

    def write(self, number: int) -> str:
        """``number`` written as this problem writes its answers (a wrong answer, say)."""
        return reverse_digits(str(number)) if self.reverse else str(number)

    def record(self) -> dict[str, Any]:
        """The ``{prompt, answer}`` record the RL task and the exact-match rewards read
        (``reversed: true`` tells the arithmetic reward how the answer is written)."""
        record: dict[str, Any] = {"prompt": self.prompt, "answer": self.text}
        return {**record, "reversed": True} if self.reverse else record


def reverse_digits(number: str) -> str:
    """``"-125"`` <-> ``"-521"``: the digits reversed, the sign kept in front (its own inverse)."""
    sign = "-" if number.startswith("-") else ""
    return sign + number.removeprefix("-")[::-1]


def problems(
    max_operand: int = 30,
    ops: str = "+*",
    held_out: float = 0.1,
    seed: int = 0,
    reverse: bool = False,
) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems over operands 0..max_operand; the split depends on the
    arguments only, so every stage of a ladder holds out the same problems."""
    bad = sorted(set(ops) - set(OPS))
    if bad or not ops:
        raise ValueError(f"data.ops={ops!r}: use operators among {''.join(OPS)}")
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"data.held_out={held_out}: must be between 0 and 1")
    every = [
        Problem(a, op, b, reverse)
        for op in ops
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]
    random.Random(seed).shuffle(every)
    n = max(1, round(len(every) * held_out))
    return every[n:], every[:n]
