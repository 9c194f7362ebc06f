"""The token cache never pairs ids with another vocabulary, never splits a special token, and
its files are readable like any other file the user writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from llm.data import TextDataModule, TextFiles
from llm.data.cache import cache_folder, ensure_token_cache, load_token_cache, split_text
from llm.tokenizers import CharTokenizer

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


def _corpus(folder: Path, text: str) -> TextFiles:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "doc.txt").write_text(text, encoding="utf-8")
    return TextFiles(folder)


def test_fitted_tokenizer_with_another_vocab_gets_its_own_cache(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "y", TEXT * 20)
    cache = tmp_path / "cache"
    trained, _ = ensure_token_cache(corpus, CharTokenizer(), cache)  # fitted on this corpus

    ours = CharTokenizer()  # a checkpoint's vocabulary, fitted on a larger text
    ours.fit([TEXT + "XYZ!?0123456789"])
    assert ours.to_dict() != load_token_cache(trained)[3].to_dict()
    folder, built = ensure_token_cache(corpus, ours, cache)
    assert built and folder != trained and cache_folder(corpus, ours, cache) == folder
    train, val, _, tok = load_token_cache(folder)
    assert tok.to_dict() == ours.to_dict()
    ids = np.concatenate([train, val]).tolist()
    assert ids == ours.encode(TEXT * 20)

    # the same vocabulary as the one cached by fitting: that cache is shared, not rebuilt
    same = load_token_cache(trained)[3]
    assert ensure_token_cache(corpus, same, cache) == (trained, False)

    # and the datamodule (llm.evaluate / llm.finetune path) reads ids of its own tokenizer
    dm = TextDataModule(corpus, ours, block_size=8, cache_dir=cache)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_path == folder and dm.tokenizer.to_dict() == ours.to_dict()


def test_split_text_never_cuts_inside_a_special_token() -> None:
    special = "<|user turn|>"  # holds a space before a letter: a place _SAFE_CUT would take
    text = "ab" * 30 + special + " word" * 10
    window = 64
    pieces = list(split_text(text, window, specials=[special]))
    assert "".join(pieces) == text and all(len(p) <= window for p in pieces)
    ends = np.cumsum([len(p) for p in pieces])[:-1]
    start = text.index(special)
    assert not any(start < e < start + len(special) for e in ends)
    # no safe place at all in the window: the hard cut moves to the special token's start
    hard = list(split_text("x" * 58 + special + "y" * 40, window, specials=[special]))
    assert hard[0] == "x" * 58 and hard[1].startswith(special)


def test_special_token_survives_a_chunk_boundary(tmp_path: Path, monkeypatch) -> None:
    from llm.data import chunking

    special = "<|user turn|>"
    monkeypatch.setattr(chunking, "CHUNK_CHARS", 64)
    text = "ab " * 18 + special + " cd" * 20
    tok = CharTokenizer(special_tokens=["<|endoftext|>", special])
    folder, _ = ensure_token_cache(_corpus(tmp_path / "c", text), tok, tmp_path / "cache")
    train, val, _, fitted = load_token_cache(folder)
    assert np.concatenate([train, val]).tolist() == fitted.encode(text)
    assert fitted.special_tokens[special] in train.tolist()


def test_val_fraction_must_leave_a_val_split(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "v", TEXT * 4)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(
            ValueError, match=r"data.val_fraction=.*must be between 0 and 1.*held out"
        ):
            TextDataModule(corpus, CharTokenizer(), block_size=8, val_fraction=bad)
    dm = TextDataModule(
        corpus, CharTokenizer(), block_size=64, val_fraction=0.05, cache_dir=tmp_path / "c"
    )
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"val split.*or a larger val_fraction than 0.05"):
        dm.setup("fit")


def test_cache_files_get_the_users_default_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        folder, _ = ensure_token_cache(_corpus(tmp_path / "p", TEXT), CharTokenizer(), tmp_path)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}
    files = ["shard-000000.bin", "tokenizer.json", "progress.json", "meta.json", "build.lock"]
    assert modes == dict.fromkeys(files, 0o644)
