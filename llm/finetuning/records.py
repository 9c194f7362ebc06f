"""Read labelled / instruction records from CSV, TSV, JSONL or JSON files, with clear errors."""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

FORMATS = ("csv", "tsv", "jsonl", "json")


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown data format {fmt!r}; expected auto or one of {FORMATS}")
        return fmt
    ext = path.suffix.lower().lstrip(".")
    if ext in ("csv", "tsv", "jsonl", "json"):
        return ext
    if ext == "txt":
        return "tsv"
    raise ValueError(f"cannot tell the format of {path} from its extension; set format={FORMATS}")


def read_records(path: str | os.PathLike[str], fmt: str = "auto") -> list[dict[str, Any]]:
    """All rows of `path` as dicts (CSV/TSV header = keys; JSON: a list of objects)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = detect_format(path, fmt)
    with open(path, encoding="utf-8", newline="") as f:
        if fmt in ("csv", "tsv"):
            rows: list[Any] = list(csv.DictReader(f, delimiter="," if fmt == "csv" else "\t"))
        elif fmt == "jsonl":
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: invalid JSON ({e})") from e
        else:
            rows = json.load(f)
            if isinstance(rows, dict) and isinstance(rows.get("data"), list):
                rows = rows["data"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of objects (one record per row)")
    if not rows:
        raise ValueError(f"{path} holds no records")
    return rows


def require_columns(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Any, hint: str = ""
) -> None:
    """Raise naming the first record that lacks a column, with the columns it does have."""
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row or row[c] is None]
        if missing:
            raise ValueError(
                f"{path}: record {i} has no {missing} (columns found: {sorted(row)}){hint}"
            )


def split_records(rows: list[Any], fractions: Sequence[float], seed: int) -> tuple[list[Any], ...]:
    """Shuffle once with `seed`, then cut off one part per fraction (>= 1 row if fraction > 0)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    parts: list[list[Any]] = []
    for frac in fractions:
        n = 0 if frac <= 0 else max(1, round(len(rows) * frac))
        parts.append(rows[:n])
        rows = rows[n:]
    if not rows:
        raise ValueError(
            f"nothing left to train on after splitting off fractions {list(fractions)}; "
            "add data or lower the fractions"
        )
    return (rows, *parts)


def examples_loader(
    examples: Sequence[Any],
    batch_size: int,
    collate_fn: Any,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
) -> DataLoader:
    """A loader over in-memory examples; shuffled with its own seeded generator (reproducible)."""
    return DataLoader(
        examples,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )
