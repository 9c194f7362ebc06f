"""Rewards for reinforcement learning (``reward=``): plain functions of
``(prompt, completion, example) -> float``, where ``example`` is the data record (its
``answer``, ...). A new one is a few lines and a ``conf/reward/<name>.yaml`` that names it with
``_partial_: true``; keyword settings in that file reach the function.
"""

from __future__ import annotations

import re
from typing import Any

from llm.finetuning.arithmetic import reverse_digits

_INTEGER = re.compile(r"\s*(-?\d+)")


def first_line(completion: str) -> str:
    """What the model answered before it went on to a new line."""
    return completion.split("\n", 1)[0].strip()


def exact_match(
    prompt: str, completion: str, example: dict[str, Any], field: str = "answer"
) -> float:
    """1.0 when the completion's first line is the record's answer (spaces around ignored)."""
    return float(first_line(completion) == str(example[field]).strip())


def arithmetic(prompt: str, completion: str, example: dict[str, Any]) -> float:
    """1.0 when the completion's line is the answer's integer and nothing else; a record with
    ``reversed: true`` has its digits least-significant first, and the completion is read so."""
    match = _INTEGER.fullmatch(first_line(completion))
    if match is None:
        return 0.0
    said, answer = match[1], str(example["answer"]).strip()
    if example.get("reversed"):
        said, answer = reverse_digits(said), reverse_digits(answer)
    return float(int(said) == int(answer))


def format_reward(
    prompt: str, completion: str, example: dict[str, Any], pattern: str = r"-?\d+"
) -> float:
    """1.0 when the completion's first line has the expected form (``pattern``), right or wrong:
    a shaping reward for a model that has not learnt the answer's shape yet."""
    return float(re.fullmatch(pattern, first_line(completion)) is not None)
