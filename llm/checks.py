"""Checks of settings that name the config key, say what it must be, and show a valid form.

A mistyped override (``optim.lr=abc``, ``data.batch_size=[1,2]``, ``temperature=nan``) should be
refused before anything runs, in one line a user can act on, not deep inside torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class SettingError(ValueError):
    """A setting with a value it cannot take."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(
    key: str, value: Any, minimum: int | None = None, nullable: bool = False, example: Any = None
) -> int | None:
    """``value`` as an int of at least ``minimum`` (None where ``nullable``)."""
    if value is None and nullable:
        return None
    if not _is_int(value) or (minimum is not None and value < minimum):
        what = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise SettingError(_message(key, value, what + (" or null" if nullable else ""), example))
    return int(value)


def number(
    key: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: float | None = None,
    below: float | None = None,
    nullable: bool = False,
    example: Any = None,
) -> float | None:
    """``value`` as a finite float within the bounds (inclusive ``minimum``/``maximum``,
    exclusive ``above``/``below``)."""
    if value is None and nullable:
        return None
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    ok = ok and (above is None or value > above) and (below is None or value < below)
    if not ok:
        bounds = [
            f">= {minimum}" if minimum is not None else "",
            f"> {above}" if above is not None else "",
            f"<= {maximum}" if maximum is not None else "",
            f"< {below}" if below is not None else "",
        ]
        what = " and ".join(b for b in bounds if b)
        what = f"a finite number {what}".strip() + (" or null" if nullable else "")
        raise SettingError(_message(key, value, what, example))
    return float(value)


def choice(key: str, value: Any, options: Sequence[str]) -> str:
    """``value`` among ``options``."""
    if value not in options:
        raise SettingError(f"{key}={value!r} is not one of {list(options)}")
    return str(value)


def flag(key: str, value: Any) -> bool:
    """``value`` as a bool: true or false, not a string or a number that might mean either."""
    if not isinstance(value, bool):
        raise SettingError(_message(key, value, "true or false", "true"))
    return value


def path(key: str, value: Any, example: str) -> Any:
    """``value``, refused when it is an empty string: ``Path('')`` is the working folder, which a
    corpus would read as "every text file under here"."""
    if isinstance(value, str) and not value.strip():
        raise SettingError(
            f"{key}={value!r} is empty: set it to a file, folder or glob, e.g. {key}={example}"
        )
    return value


def data_path(data: Any) -> None:
    """``data.path`` where the data config has one and it is set (``???`` raises on its own)."""
    if data is not None and "path" in data.keys():  # noqa: SIM118 - `in` is False for a `???`
        path("data.path", data.get("path"), example="data/my_corpus.txt")


def _message(key: str, value: Any, what: str, example: Any) -> str:
    shown = repr(value) if isinstance(value, str) else value
    hint = f", e.g. {key}={example}" if example is not None else ""
    return f"{key}={shown}: must be {what}{hint}"


def context_fits(data_block_size: Any, model_block_size: Any) -> None:
    """``data.block_size`` cannot exceed ``model.block_size``: the model cannot attend over
    longer sequences than its position table."""
    if data_block_size is not None and int(data_block_size) > int(model_block_size):
        raise SettingError(
            f"data.block_size={data_block_size} > model.block_size={model_block_size}: the "
            "model cannot attend over longer sequences than its position table; lower "
            "data.block_size or raise model.block_size"
        )
