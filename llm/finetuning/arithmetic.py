"""Arithmetic problems (``a+b=``, ``a*b=``) for the post-training ladder: every problem of the
given operands enumerated, shuffled once with a fixed seed and cut into a held-out part that no
stage trains on (pretraining text, instructions, preference pairs or RL prompts) and the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b, "-": lambda a, b: a - b}


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return int(OPS[self.op](self.a, self.b))

    def record(self) -> dict[str, str]:
        """The ``{prompt, answer}`` record the RL task and the exact-match rewards read."""
        return {"prompt": self.prompt, "answer": str(self.answer)}


def problems(
    max_operand: int = 30, ops: str = "+*", held_out: float = 0.1, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems over operands 0..max_operand; the split depends on the
    arguments only, so every stage of a ladder holds out the same problems."""
    bad = sorted(set(ops) - set(OPS))
    if bad or not ops:
        raise ValueError(f"data.ops={ops!r}: use operators among {''.join(OPS)}")
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"data.held_out={held_out}: must be between 0 and 1")
    every = [
        Problem(a, op, b)
        for op in ops
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]
    random.Random(seed).shuffle(every)
    n = max(1, round(len(every) * held_out))
    return every[n:], every[:n]
