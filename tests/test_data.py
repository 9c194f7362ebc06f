"""Corpora, token cache, DataModule and the prepare CLI, on small local data (no network)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, SHAKESPEARE, VERDICT, compose, run_cli

from llm.data import (
    HFDataset,
    TextDataModule,
    TextFiles,
    TinyShakespeare,
    build_token_cache,
    ensure_token_cache,
    load_token_cache,
    split_text,
)
from llm.data import corpus as corpus_mod
from llm.tokenizers import CharTokenizer, TiktokenTokenizer


@pytest.fixture(scope="module")
def gpt2() -> TiktokenTokenizer:
    return TiktokenTokenizer(name="gpt2")


@pytest.fixture
def verdict(tmp_path: Path) -> Path:
    dst = tmp_path / "verdict" / "the-verdict.txt"
    dst.parent.mkdir()
    dst.write_bytes(VERDICT.read_bytes())
    return dst


# ----------------------------------------------------------------------------- corpora


def test_text_files_single_folder_glob(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "d" / "sub" / "a.md").write_text("ay", encoding="utf-8")
    (tmp_path / "d" / "skip.csv").write_text("no", encoding="utf-8")
    assert list(TextFiles(tmp_path / "d" / "b.txt").iter_documents()) == ["bee"]
    assert list(TextFiles(tmp_path / "d").iter_documents()) == ["bee", "ay"]
    assert list(TextFiles(tmp_path / "d", pattern="*.md").iter_documents()) == ["ay"]
    assert list(TextFiles(str(tmp_path / "d" / "**" / "*.md")).iter_documents()) == ["ay"]


def test_text_files_checksum_stable_and_content_sensitive(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hello", encoding="utf-8")
    c1, c2 = TextFiles(f).checksum(), TextFiles(f).checksum()
    assert c1 == c2 and len(c1) == 64
    f.write_text("hellp", encoding="utf-8")
    assert TextFiles(f).checksum() != c1


def test_text_files_no_match_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        TextFiles(tmp_path / "nothing-here").files()
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        TextFiles(tmp_path / "empty_dir").files()


def test_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf" + "é au lait".encode("latin-1"))
    with pytest.raises(ValueError) as e:
        list(TextFiles(f).iter_documents())
    assert "latin1.txt" in str(e.value) and "byte offset 3" in str(e.value)


def test_empty_corpus_is_a_clear_error(tmp_path: Path, gpt2: TiktokenTokenizer) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        build_token_cache(TextFiles(f), gpt2, tmp_path / "cache")


def _fake_urlopen(data: bytes | None):
    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self) -> bytes:
            return data

    def urlopen(url, timeout=None):
        if data is None:
            raise urllib.error.URLError("network is unreachable")
        return Response()

    return urlopen


def test_tinyshakespeare_offline_error_says_where(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", _fake_urlopen(None))
    path = tmp_path / "ts" / "input.txt"
    with pytest.raises(RuntimeError) as e:
        TinyShakespeare(path).checksum()
    assert str(path.resolve()) in str(e.value) and TinyShakespeare.URL in str(e.value)
    assert not path.exists()


def test_tinyshakespeare_checksum_mismatch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", _fake_urlopen(b"not shakespeare"))
    path = tmp_path / "input.txt"
    with pytest.raises(ValueError, match="sha256"):
        TinyShakespeare(path).checksum()
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing, not even a tmp file
    path.write_text("corrupt", encoding="utf-8")  # a wrong file already there is refused too
    with pytest.raises(ValueError, match="sha256"):
        list(TinyShakespeare(path).iter_documents())


def test_tinyshakespeare_download_writes_file(tmp_path: Path, monkeypatch) -> None:
    data = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", _fake_urlopen(data))
    sha = hashlib.sha256(data).hexdigest()
    path = tmp_path / "deep" / "input.txt"
    corpus = TinyShakespeare(path, sha256=sha)
    assert list(corpus.iter_documents()) == [data.decode()]
    assert path.read_bytes() == data and corpus.checksum() == sha


@pytest.mark.slow
def test_hf_dataset_local_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"text": "first doc", "id": 1}, {"text": "second doc", "id": 2}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    import datasets

    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    for path in (jsonl, parquet):
        c = HFDataset(path)
        assert list(c.iter_documents()) == ["first doc", "second doc"]
        assert c.checksum() == HFDataset(path).checksum()
        assert c.checksum() != HFDataset(path, split="train", text_column="id").checksum()
    with pytest.raises(KeyError) as e:
        list(HFDataset(jsonl, text_column="body").iter_documents())
    assert "'body'" in str(e.value) and "text" in str(e.value) and "id" in str(e.value)


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


@pytest.mark.slow
def test_hf_dataset_local_folder_checksum_sees_file_content(tmp_path: Path) -> None:
    """The builder fingerprint ignores edits, so a folder's files must be hashed themselves."""
    folder = tmp_path / "d"
    _write_jsonl(folder / "part.jsonl", ["hello world", "foo bar"])
    c1 = HFDataset(folder).checksum()
    assert HFDataset(folder).checksum() == c1
    _write_jsonl(folder / ".hidden" / "x.jsonl", ["ignored by datasets"])
    assert HFDataset(folder).checksum() == c1
    _write_jsonl(folder / "part.jsonl", ["completely different content", "xyz"])
    assert list(HFDataset(folder).iter_documents()) == ["completely different content", "xyz"]
    c2 = HFDataset(folder).checksum()
    assert c2 != c1
    (folder / "part.jsonl").rename(folder / "other.jsonl")
    assert HFDataset(folder).checksum() != c2


def test_hf_dataset_takes_data_files_from_hydra(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    ds = HFDataset("json", data_files=OmegaConf.create({"train": [str(rows)]}))
    assert ds.data_files == {"train": [str(rows)]}
    assert list(ds.iter_documents()) == ["one", "two"]


def test_hf_dataset_local_data_files_checksum_sees_file_content(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    _write_jsonl(folder / "sub" / "a.jsonl", ["one"])
    _write_jsonl(folder / "b.jsonl", ["two"])
    corpora = {
        "absolute glob": lambda: HFDataset("json", data_files=str(folder / "**" / "*.jsonl")),
        "relative to the folder": lambda: HFDataset(folder, data_files={"train": "sub/*.jsonl"}),
        "list": lambda: HFDataset("json", data_files=[str(folder / "sub" / "a.jsonl")]),
    }
    before = {k: make().checksum() for k, make in corpora.items()}
    _write_jsonl(folder / "sub" / "a.jsonl", ["changed"])
    for k, make in corpora.items():
        assert make().checksum() != before[k], k
    assert list(corpora["absolute glob"]().iter_documents()) == ["two", "changed"]


# ----------------------------------------------------------------------------- token cache


def test_split_text_keeps_gpt2_ids(gpt2: TiktokenTokenizer) -> None:
    text = VERDICT.read_text(encoding="utf-8")
    pieces = list(split_text(text, max_chars=1000))
    assert len(pieces) > 15 and "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces)
    assert [i for p in pieces for i in gpt2.encode(p)] == gpt2.encode(text)


def test_cache_verdict_gpt2(verdict: Path, tmp_path: Path, gpt2: TiktokenTokenizer) -> None:
    corpus = TextFiles(verdict)
    folder, built = ensure_token_cache(corpus, gpt2, tmp_path / "cache", shard_tokens=2000)
    assert built and folder.name.startswith(corpus.checksum()[:12])
    assert folder.name.endswith(gpt2.identity())
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["total"] == 5145 and meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    assert [s["tokens"] for s in meta["shards"]] == [2000, 2000, 1145]
    assert meta["corpus"]["checksum"] == corpus.checksum() and meta["shard_tokens"] == 2000
    train, val, meta2, tok = load_token_cache(folder, val_fraction=0.1)
    assert meta2 == meta and train.dtype == np.uint16
    assert (len(train), len(val)) == (int(5145 * 0.9), 5145 - int(5145 * 0.9))
    stream = gpt2.encode(verdict.read_text(encoding="utf-8"))
    assert train.tolist() + val.tolist() == stream  # val is the tail of the stream
    assert tok.decode(val.tolist()) == gpt2.decode(stream[len(train) :])
    assert sorted(p.name for p in folder.iterdir()) == [
        "build.lock",
        "meta.json",
        "progress.json",
        "shard-000000.bin",
        "shard-000001.bin",
        "shard-000002.bin",
        "tokenizer.json",
    ]
    # second run: reused, nothing rewritten; val_fraction is taken at load time
    mtime = (folder / "shard-000000.bin").stat().st_mtime_ns
    assert ensure_token_cache(corpus, gpt2, tmp_path / "cache") == (folder, False)
    assert (folder / "shard-000000.bin").stat().st_mtime_ns == mtime
    assert len(load_token_cache(folder, val_fraction=0.5)[1]) == 5145 - int(5145 * 0.5)
    # a changed corpus gets a new folder
    verdict.write_text(verdict.read_text(encoding="utf-8") + "\nThe end.", encoding="utf-8")
    folder2 = build_token_cache(TextFiles(verdict), gpt2, tmp_path / "cache")
    assert folder2 != folder and folder.exists()


def test_cache_char_tokenizer_fitted_and_eot_between_docs(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "1.txt").write_text("abc\n", encoding="utf-8")
    (tmp_path / "docs" / "2.txt").write_text("cab", encoding="utf-8")
    tok = CharTokenizer()
    identity = tok.identity()
    folder = build_token_cache(TextFiles(tmp_path / "docs"), tok, tmp_path / "cache")
    assert folder.name.endswith(identity)  # named by the config, fixed before fitting
    train, val, meta, fitted = load_token_cache(folder, 0.25)
    assert fitted.eot_id is not None and meta["vocab_size"] == fitted.vocab_size
    ids = train.tolist() + val.tolist()
    assert len(ids) == 8 and ids[4] == fitted.eot_id  # "abc\n" <eot> "cab"
    assert fitted.decode(ids[:4]) == "abc\n" and fitted.decode(ids[5:]) == "cab"
    assert (len(train), len(val), meta["total"]) == (6, 2, 8)


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


# each way the data and meta.json can disagree, and the reason logged for it
DAMAGE = {
    "truncate": "shard-000001.bin has 1000 bytes",  # as a run killed while writing
    "delete_shard": "missing shard-000002.bin",
    "bad_meta": "bad meta.json",
    "bad_tokenizer": "bad tokenizer.json",
    "dtype": "dtype uint32 is not the one for vocab_size 50257",
    "total": "the shards hold 5145 tokens, meta.json's total is 5000",
    "shard_count": "shard-000000.bin has 4000 bytes, meta.json says 1999 x 2",
    "tokenizer_vs_meta": "disagrees with meta.json",
    "old_version": "cache version 1 != 2",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_is_rebuilt(
    damage: str, verdict: Path, tmp_path: Path, gpt2: TiktokenTokenizer, caplog
) -> None:
    corpus = TextFiles(verdict)
    folder = build_token_cache(corpus, gpt2, tmp_path / "cache", shard_tokens=2000)
    shards = sorted(folder.glob("shard-*.bin"))
    good = [f.read_bytes() for f in shards]
    if damage == "truncate":
        with open(folder / "shard-000001.bin", "r+b") as f:
            f.truncate(1000)
    elif damage == "delete_shard":
        (folder / "shard-000002.bin").unlink()
    elif damage == "bad_meta":
        (folder / "meta.json").write_text("{not json", encoding="utf-8")
    elif damage == "bad_tokenizer":
        (folder / "tokenizer.json").write_text("", encoding="utf-8")
    elif damage == "dtype":
        _edit_meta(folder, lambda m: m.update(dtype="uint32"))
    elif damage == "total":
        _edit_meta(folder, lambda m: m.update(total=5000))
    elif damage == "shard_count":
        _edit_meta(folder, lambda m: m["shards"][0].update(tokens=1999))
    elif damage == "tokenizer_vs_meta":
        _edit_meta(folder, lambda m: m.update(eot_id=0))
    else:  # a cache of version 1: train.bin and val.bin, which the rebuild removes
        _edit_meta(folder, lambda m: m.update(version=1))
        (folder / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="not usable"):
        load_token_cache(folder)
    with caplog.at_level("WARNING"):
        again, built = ensure_token_cache(corpus, gpt2, tmp_path / "cache", shard_tokens=2000)
    assert built and again == folder
    assert f"rebuilding token cache {folder}: " in caplog.text
    assert DAMAGE[damage] in caplog.text
    assert [f.read_bytes() for f in sorted(folder.glob("shard-*.bin"))] == good
    assert load_token_cache(folder)[2]["total"] == 5145
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no tmp files left
    assert not (folder / "train.bin").exists()


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tiny shakespeare not available")
def test_tinyshakespeare_gpt2_count(tmp_path: Path, gpt2: TiktokenTokenizer) -> None:
    path = tmp_path / "input.txt"
    path.write_bytes(SHAKESPEARE.read_bytes())
    folder = build_token_cache(TinyShakespeare(path), gpt2, tmp_path / "cache")
    train, val, meta, _ = load_token_cache(folder)
    assert meta["total"] == len(train) + len(val) == 338_025  # the 1 MB chunking changes nothing


# ----------------------------------------------------------------------------- datamodule


def test_datamodule_batches(verdict: Path, tmp_path: Path, gpt2: TiktokenTokenizer) -> None:
    from functools import partial

    dm = TextDataModule(
        partial(TextFiles),
        gpt2,
        block_size=4,
        stride=1,
        batch_size=8,
        path=verdict,
        cache_dir=tmp_path / "cache",
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == 50257
    stream = gpt2.encode(verdict.read_text(encoding="utf-8"))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 4) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        starts = [i for i in range(len(stream) - 4) if stream[i : i + 4] == row_x]
        assert any(stream[s + 1 : s + 5] == row_y for s in starts)
    assert len(dm.train_dataset) == int(5145 * 0.9) - 4  # stride 1: every position
    # val: the non-overlapping windows of the tail, in one fixed shuffled order, so that the
    # first few batches (limit_val_batches) sample the whole split, the same ones every time
    n_train = int(5145 * 0.9)
    tail = [stream[n_train + i : n_train + i + 4] for i in range(0, 5145 - n_train - 4, 4)]
    rows = [(bx.tolist(), by.tolist()) for bx, by in dm.val_dataloader()]
    vx = [r for bx, _ in rows for r in bx]
    assert sorted(vx) == sorted(tail) and vx != tail  # every window once, not in stream order
    first = next(iter(dm.val_dataloader()))[0]
    assert first.tolist() == rows[0][0]  # the same order at every evaluation
    starts = [n_train + 4 * tail.index(w) for w in first.tolist()]
    assert max(starts) - min(starts) > (5145 - n_train) // 2  # spread over the split
    for w, st in zip(rows[0][0], starts, strict=True):
        assert rows[0][1][rows[0][0].index(w)] == stream[st + 1 : st + 5]
    # shuffling is seeded: the same seed gives the same first batch
    assert torch.equal(next(iter(dm.train_dataloader()))[0], x)


def test_seed_orders_train_windows_not_the_val_sample(tmp_path: Path) -> None:
    """`seed=S` reshuffles training; evaluation stays on the same windows; resume keeps order."""
    f = tmp_path / "t.txt"
    f.write_text("".join(chr(97 + (i * 7) % 26) for i in range(3000)), encoding="utf-8")

    def module(seed: int) -> TextDataModule:
        dm = TextDataModule(
            TextFiles(f), CharTokenizer(), 8, 1, 4, cache_dir=tmp_path / "c", seed=seed
        )
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def first(loader) -> torch.Tensor:
        return next(iter(loader))[0]

    a, b = module(1), module(2)
    assert not torch.equal(first(a.train_dataloader()), first(b.train_dataloader()))
    assert all(
        torch.equal(va[0], vb[0])
        for va, vb in zip(a.val_dataloader(), b.val_dataloader(), strict=True)
    )
    b.load_state_dict({"train_batches_consumed": 0, "seed": 1})  # a checkpoint of seed 1
    assert b.seed == 1 and torch.equal(first(b.train_dataloader()), first(a.train_dataloader()))
    cfg = compose("train", ["seed=7", "data=text_files", f"data.path={f}"])
    assert cfg.data.seed == 7
    assert compose("train", ["data=text_files", f"data.path={f}"]).data.seed == 1337  # the default


def test_datamodule_char_tokenizer_is_fitted_after_prepare(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("hello world\n" * 20, encoding="utf-8")
    dm = TextDataModule(TextFiles(f), CharTokenizer(), block_size=8, cache_dir=tmp_path / "c")
    dm.prepare_data()
    dm.setup("fit")
    assert not dm.tokenizer.needs_fit and dm.vocab_size >= len(set("hello world\n"))
    dm2 = TextDataModule(TextFiles(f), CharTokenizer(), block_size=8, cache_dir=tmp_path / "c")
    dm2.setup("fit")  # a DDP rank that skipped prepare_data finds the same cache
    assert dm2.cache_path == dm.cache_path and len(dm2.train_dataset) == len(dm.train_dataset)


def test_datamodule_corpus_too_short(tmp_path: Path, gpt2: TiktokenTokenizer) -> None:
    f = tmp_path / "short.txt"
    f.write_text("Just a few words here, nothing more.", encoding="utf-8")
    dm = TextDataModule(TextFiles(f), gpt2, block_size=64, cache_dir=tmp_path / "c")
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"train split.*needs at least 65.*smaller block_size"):
        dm.setup("fit")


@pytest.mark.parametrize(("block_size", "stride"), [(0, None), (-1, None), (8, 0), (8, -2)])
def test_datamodule_bad_sizes(block_size: int, stride: int | None, tmp_path: Path) -> None:
    key = "data.block_size" if block_size <= 0 else "data.stride"
    with pytest.raises(ValueError, match=rf"{key}=-?\d+: must be an integer >= 1"):
        TextDataModule(TextFiles(tmp_path), None, block_size=block_size, stride=stride)


def test_hydra_config_instantiates(verdict: Path, tmp_path: Path, gpt2: TiktokenTokenizer) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "prepare",
            overrides=[
                "data=text_files",
                f"data.path={verdict}",
                f"paths.data_dir={tmp_path}",
                "data.block_size=16",  # prepare has no model: the window is the data's own
            ],
        )
    dm = instantiate(cfg.data, tokenizer=gpt2)
    assert isinstance(dm.corpus, TextFiles) and dm.block_size == 16 and dm.stride == 16
    assert Path(dm.cache_dir) == tmp_path / "cache"


# ----------------------------------------------------------------------------- prepare CLI


def _prepare(*overrides: str) -> subprocess.CompletedProcess:
    return run_cli("prepare", *overrides)


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tiny shakespeare not available")
def test_prepare_cli_builds_reuses_and_repairs(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from llm.cli.prepare import prepare

    data_dir = tmp_path / "data"
    (data_dir / "tinyshakespeare").mkdir(parents=True)
    (data_dir / "tinyshakespeare" / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
    args = ("data=tinyshakespeare", "tokenizer=gpt2", f"paths.data_dir={data_dir}")
    r = _prepare(*args)
    assert r.returncode == 0, r.stderr
    assert "token cache built" in r.stdout and "338,025 tokens" in r.stdout
    assert "uint16" in r.stdout and "1 (shard-*.bin)" in r.stdout
    (folder,) = (data_dir / "cache").iterdir()
    good = (folder / "shard-000000.bin").read_bytes()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides=list(args))
    stats = prepare(cfg)  # in-process: a second run reuses the cache
    assert stats["status"] == "reused" and stats["total_tokens"] == 338_025
    assert stats["train_tokens"] == int(338_025 * 0.9)
    with open(folder / "shard-000000.bin", "r+b") as f:  # damaged
        f.truncate(len(good) // 3)
    r = _prepare(*args)
    assert r.returncode == 0 and "token cache built" in r.stdout, r.stderr
    assert "rebuilding token cache" in r.stderr and "shard-000000.bin has" in r.stderr
    assert (folder / "shard-000000.bin").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written elsewhere
