"""Read labelled / instruction records from CSV, TSV, JSONL or JSON files, with clear errors."""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Sampler

from llm.data.corpus import read_utf8
from llm.data.datamodule import ResumableLoader, ResumableOrder

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
SOURCE = "_source"  # each record's file and line (or index), for errors that name the row


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown data format {fmt!r}; expected auto or one of {FORMATS}")
        return fmt
    ext = path.suffix.lower().lstrip(".")
    if ext in FORMATS:
        return ext
    if ext == "txt":
        return "tsv"
    raise ValueError(f"cannot tell the format of {path} from its extension; set format={FORMATS}")


def read_records(path: str | os.PathLike[str], fmt: str = "auto") -> list[dict[str, Any]]:
    """All rows of `path` as dicts (CSV/TSV header = keys; JSON: a list of objects; parquet).

    UTF-8 with or without a byte-order mark; a bad byte, a malformed line or a CSV/TSV row
    with a missing or extra field is refused with its byte offset or line number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = detect_format(path, fmt)
    sources: list[str] = []
    if fmt == "parquet":  # a Hugging Face dataset's files (its nested lists and dicts kept)
        import pyarrow.parquet as pq

        try:
            rows: Any = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors have no common base
            raise ValueError(f"{path}: not a readable parquet file ({e})") from e
        sources = [f"{path} row {i}" for i in range(len(rows))]
        return _with_sources(rows, sources, path)
    text = read_utf8(path).removeprefix("\ufeff")  # Excel and Notepad write a BOM
    if fmt in ("csv", "tsv"):
        rows = _table(io.StringIO(text, newline=""), "," if fmt == "csv" else "\t", path)
        sources = [f"{path}:{row.pop(SOURCE)}" for row in rows]
    elif fmt == "jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e})") from e
                sources.append(f"{path}:{n}")
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        sources = [f"{path} record {i}" for i in range(len(rows) if isinstance(rows, list) else 0)]
    return _with_sources(rows, sources, path)


def _with_sources(rows: Any, sources: list[str], path: Path) -> list[dict[str, Any]]:
    """``rows``, checked to be records, each with its file and line (or index)."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of objects (one record per row)")
    if not rows:
        raise ValueError(f"{path} holds no records")
    for row, source in zip(rows, sources, strict=True):
        row[SOURCE] = source
    return rows


def encode_field(tokenizer: Any, row: dict[str, Any], key: str, hint: str = "") -> list[int]:
    """The ids of ``row[key]``; a text the tokenizer cannot encode (a character a char
    vocabulary lacks) is named by its file and line."""
    try:
        return list(tokenizer.encode(str(row[key])))
    except ValueError as e:
        raise ValueError(f"{row.get(SOURCE, 'a record')}, field {key!r}: {e}{hint}") from e


def _table(f: io.StringIO, delimiter: str, path: Path) -> list[dict[str, Any]]:
    """CSV/TSV rows; a row whose field count is not the header's is named by its line, never
    guessed at (csv would fill a missing field with None and gather extra ones in a list)."""
    extra = object()
    reader = csv.DictReader(f, delimiter=delimiter, restkey=extra)  # type: ignore[arg-type]
    rows = []
    for row in reader:
        header = len(reader.fieldnames or [])
        if extra in row or any(v is None for v in row.values()):
            found = header + len(row.get(extra, [])) - sum(v is None for v in row.values())
            kind = "an unquoted delimiter in a field?" if found > header else "a missing field?"
            sep = "tab" if delimiter == "\t" else "comma"
            raise ValueError(
                f"{path}:{reader.line_num}: {found} {sep}-separated fields where the header "
                f"has {header} ({kind}); fix that row, or quote fields that hold a {sep}"
            )
        row[SOURCE] = reader.line_num
        rows.append(row)
    return rows


def require_columns(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Any, hint: str = ""
) -> None:
    """Raise naming the first record that lacks a column, with the columns it does have."""
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row or row[c] is None]
        if missing:
            raise ValueError(
                f"{path}: record {i} has no {missing} "
                f"(columns found: {sorted(k for k in row if k != SOURCE)}){hint}"
            )


def example_length(max_length: int | None, block_size: int | None) -> int:
    """Tokens per example: ``data.max_length``, else the model's context, never above it."""
    if max_length is None and block_size is None:
        raise ValueError("set data.max_length (or block_size) for these records")
    length = int(max_length if max_length is not None else block_size)  # type: ignore[arg-type]
    if block_size is not None and length > int(block_size):
        raise ValueError(
            f"data.max_length={length} > the model's block_size {block_size}; lower max_length"
        )
    return length


def train_and_val(
    path: str,
    val_path: str | None,
    val_fraction: float,
    seed: int,
    read: Callable[[str], list[dict[str, Any]]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, val records): ``val_path``'s when given, else ``val_fraction`` of
    ``path``'s split off with ``seed``; ``read`` reads and checks one file."""
    rows = read(path)
    if val_path:
        return rows, read(val_path)
    train, val = split_records(rows, [val_fraction], seed)
    return train, val


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
    sampler: Sampler[int] | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A loader over in-memory examples, in ``sampler``'s order (train: the data module's
    resumable seeded order, :class:`llm.data.datamodule.ResumableOrder`, in the loader that
    says so to Lightning), else as listed."""
    return (DataLoader if sampler is None else ResumableLoader)(
        examples,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
    )


class ExampleSplits(ResumableOrder):
    """The loaders of a data module that holds its examples in memory, a list per split
    (`split_examples`), batched by `collate_batch`: the train split in the resumable seeded
    order, the others as listed."""

    num_workers: int

    def split_examples(self, split: str) -> Sequence[Any]:
        raise NotImplementedError

    def collate_batch(self, batch: Sequence[Any]) -> Any:
        raise NotImplementedError

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        data = self.split_examples(split) or []
        sampler = self.train_sampler(len(data)) if shuffle else None
        return examples_loader(data, self.batch_size, self.collate_batch, sampler, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")
