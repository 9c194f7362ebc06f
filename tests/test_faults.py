"""Killed at a named event (``LLM_FAULT``, :mod:`llm.faults`), then run again: the result is the
one an uninterrupted run gives. The fast part of ``scripts/fault_check.py``, which kills at
random moments instead."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from helpers import VERDICT, run_cli

from llm import faults


def test_fault_spec_is_parsed_and_checked() -> None:
    assert faults.parse("train.step") == ("train.step", 1, signal.SIGKILL)
    assert faults.parse("prepare.write@7:sigterm") == ("prepare.write", 7, signal.SIGTERM)
    for bad in ("x@0", "x@two", "x:SIGNOPE", "@3"):
        with pytest.raises(ValueError, match="LLM_FAULT="):
            faults.parse(bad)


# ----------------------------------------------------------------------------- llm prepare


def _corpus(folder: Path, shape: str) -> Path:
    """One 2.6 MB document (tasks and pieces cut inside it) or 40 small ones."""
    text = VERDICT.read_text(encoding="utf-8")
    if shape == "one_document":
        path = folder / "one.txt"
        path.write_text(text * 128, encoding="utf-8")
        return path
    docs = folder / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(text[i * 400 :] + text[: i * 400], encoding="utf-8")
    return docs


def _prepare(corpus: Path, data_dir: Path, workers: int, fault: str | None = None) -> int:
    """``llm prepare`` of ``corpus`` into ``data_dir``; its exit code (a signal's: negative)."""
    args = [
        "data=text_files",
        f"data.path={corpus}",
        "tokenizer=char",
        "data.shard_tokens=100000",
        f"data.tokenize_workers={workers}",
        f"paths.data_dir={data_dir}",
    ]
    done = run_cli("prepare", *args, **({faults.ENV: fault} if fault else {}))
    if fault is None:
        assert done.returncode == 0, done.stderr
    if done.returncode == 143:  # SIGTERM: a clean stop that says once how to go on
        assert done.stderr.count("run the same command again to resume") == 1, done.stderr
    return done.returncode


def _cache(data_dir: Path) -> tuple[Path, dict[str, bytes], dict]:
    (folder,) = (data_dir / "cache").iterdir()
    shards = {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.bin"))}
    return folder, shards, json.loads((folder / "meta.json").read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "workers", "fault", "code"),
    [  # the first fails without the resume point's fix: the document was read again from 0
        ("one_document", 1, "prepare.shard_recorded@23", -signal.SIGKILL),
        ("many_documents", 2, "prepare.shard_renamed@2", -signal.SIGKILL),
        ("one_document", 2, "prepare.write@20:SIGTERM", 143),
    ],
)
def test_killed_prepare_rerun_equals_an_uninterrupted_build(
    tmp_path: Path, shape: str, workers: int, fault: str, code: int
) -> None:
    corpus = _corpus(tmp_path, shape)
    _prepare(corpus, tmp_path / "straight", workers)
    assert _prepare(corpus, tmp_path / "killed", workers, fault) == code
    (killed,) = (tmp_path / "killed" / "cache").iterdir()
    assert not (killed / "meta.json").exists()  # never a valid cache after a kill
    _prepare(corpus, tmp_path / "killed", workers)

    _, straight, meta = _cache(tmp_path / "straight")
    folder, resumed, resumed_meta = _cache(tmp_path / "killed")
    assert len(straight) > 3 and resumed == straight  # byte-identical shards, none extra
    assert resumed_meta["total"] == meta["total"] == sum(len(b) for b in straight.values()) // 2
    assert resumed_meta["text_bytes"] == meta["text_bytes"] == corpus_bytes(corpus)
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def corpus_bytes(path: Path) -> int:
    files = [path] if path.is_file() else sorted(path.iterdir())
    return sum(f.stat().st_size for f in files)
