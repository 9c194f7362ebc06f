"""Pretokenization into shards: parallel ids equal a single-process encoding, shards read as one
stream, the token cap, refused ids, resuming a killed build, the lock, progress, web corpora."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ENV, ROOT, compose
from hypothesis import given, settings
from hypothesis import strategies as st

from llm import faults
from llm.data import (
    TextFiles,
    TokenIdError,
    TokenShards,
    build_token_cache,
    check_cache,
    chunking,
    ensure_token_cache,
    load_token_cache,
)
from llm.data import corpus as corpus_mod
from llm.data.chunking import iter_pieces, split_text
from llm.data.progress import BuildProgress
from llm.tokenizers import BPETokenizer, CharTokenizer, TiktokenTokenizer

WORDS = ["the", "Queen", "said", "naïve", "café", "—", "42", "x", "\n", "hello,", "world.", "  "]
VOLATILE = ("seconds", "created", "workers")  # meta.json fields that say how, not what


@pytest.fixture
def small_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many tasks, pieces and read blocks from a few KB of text."""
    monkeypatch.setattr(chunking, "TASK_CHARS", 400)
    monkeypatch.setattr(chunking, "CHUNK_CHARS", 300)
    monkeypatch.setattr(corpus_mod, "TEXT_BLOCK", 1000)


def _write_docs(folder: Path, n: int = 30, seed: int = 0) -> list[str]:
    """``n`` documents (one of them empty, one long) as ``folder/000.txt``, ..."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n):
        length = 0 if i == 5 else 2000 if i == 7 else rng.randint(1, 60)
        docs.append(" ".join(rng.choice(WORDS) for _ in range(length)))
        (folder / f"{i:03d}.txt").write_text(docs[-1], encoding="utf-8")
    return docs


def _joined(tok, docs: list[str]) -> list[int]:
    """What a single process encoding each whole document, end-of-text between them, gives."""
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            ids.append(tok.eot_id)
        ids += tok.encode(doc)
    return ids


def _stream(folder: Path) -> np.ndarray:
    train, val, _, _ = load_token_cache(folder)
    return np.concatenate([np.asarray(train), np.asarray(val)])


def _contents(folder: Path) -> dict[str, object]:
    """Every file of a cache by name: bytes, meta.json without its timing fields."""
    out: dict[str, object] = {}
    for f in sorted(folder.iterdir()):
        if f.name == "meta.json":
            meta = json.loads(f.read_text())
            out[f.name] = {k: v for k, v in meta.items() if k not in VOLATILE}
        elif f.name != "build.lock":
            out[f.name] = f.read_bytes()
    return out


def _tokenizer(kind: str):
    return {
        "gpt2": lambda: TiktokenTokenizer("gpt2"),
        "char": CharTokenizer,
        "bpe": lambda: BPETokenizer(vocab_size=300),
    }[kind]()


# ----------------------------------------------------------------------------- pieces


@settings(max_examples=150, deadline=None)
@given(
    words=st.lists(st.sampled_from(["a", "b", " ", "\n", "é", "1", ".", "<|s|>", "ab "])),
    max_chars=st.integers(5, 40),
    block=st.integers(1, 50),
    special=st.booleans(),
)
def test_streamed_pieces_are_split_texts(
    words: list[str], max_chars: int, block: int, special: bool
):
    """Read in blocks of any size, a document is cut exactly where split_text cuts it whole."""
    text = "".join(words)
    specials = ["<|s|>"] if special else []
    whole = list(split_text(text, max_chars, specials)) or [""]
    blocks = [(3, text[i : i + block]) for i in range(0, len(text), block)] or [(3, "")]
    got = list(iter_pieces(blocks, max_chars, specials))
    assert [p for _, _, p in got] == whole
    assert [c for _, c, _ in got] == [sum(map(len, whole[:i])) for i in range(len(whole))]
    # resuming at any piece start gives the pieces from there on; a corpus reads the document
    # again from its start, so the text before start_char is skipped, not cut again
    for k in range(len(whole)):
        start = got[k][1]
        assert list(iter_pieces(blocks, max_chars, specials, start_char=start)) == got[k:]


def test_streamed_utf8_names_the_byte_offset_across_blocks(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_bytes("naïve café ".encode() * 3 + b"\xff tail")
    with pytest.raises(ValueError, match="byte 0xff at byte offset 39"):
        list(corpus_mod.iter_utf8(f, block=4))  # é and ï split across blocks decode fine
    f.write_bytes("naïve café ".encode() * 3)
    assert "".join(corpus_mod.iter_utf8(f, block=3)) == "naïve café " * 3


# ----------------------------------------------------------------------------- building


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe"])
def test_parallel_build_equals_single_process_encoding(
    kind: str, tmp_path: Path, small_tasks: None
) -> None:
    docs = _write_docs(tmp_path / "docs")
    corpus = TextFiles(tmp_path / "docs")
    one = build_token_cache(corpus, _tokenizer(kind), tmp_path / "one", workers=1, shard_tokens=700)
    two = build_token_cache(corpus, _tokenizer(kind), tmp_path / "two", workers=2, shard_tokens=700)
    assert _contents(one) == _contents(two)  # same shards, tokenizer and progress, byte for byte
    _, _, meta, tok = load_token_cache(two)
    assert len(meta["shards"]) >= 3 and meta["workers"] == 2
    assert _stream(two).tolist() == _joined(tok, docs)


def test_shards_are_read_as_one_stream(tmp_path: Path, small_tasks: None) -> None:
    from llm.data import SlidingWindowDataset

    _write_docs(tmp_path / "docs")
    corpus = TextFiles(tmp_path / "docs")
    folder = build_token_cache(corpus, CharTokenizer(), tmp_path / "c", shard_tokens=1000)
    meta = json.loads((folder / "meta.json").read_text())
    counts = [s["tokens"] for s in meta["shards"]]
    assert set(counts[:-1]) == {1000} and 0 < counts[-1] <= 1000 and sum(counts) == meta["total"]
    files = [folder / s["file"] for s in meta["shards"]]
    assert [f.stat().st_size for f in files] == [2 * c for c in counts]  # uint16
    flat = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in files])
    stream = TokenShards(files, counts, "uint16")
    n = len(flat)
    for a, b in [(0, 1000), (995, 1005), (500, 3500), (1999, 2000), (0, n), (n - 3, n + 5), (7, 7)]:
        assert np.array_equal(stream[a:b], flat[a:b])
    assert stream[-1] == flat[-1] and stream[1500] == flat[1500]
    with pytest.raises(IndexError):
        stream[n]
    view = stream.view(1500, 4200)
    assert len(view) == 2700 and np.array_equal(view[490:530], flat[1990:2030])
    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(view))), flat[1500:4200])

    # windows span shard boundaries: the splits are those of a one-shard cache
    whole = build_token_cache(corpus, CharTokenizer(), tmp_path / "w", shard_tokens=10**9)
    for a, b in zip(load_token_cache(folder)[:2], load_token_cache(whole)[:2], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    ds = SlidingWindowDataset(load_token_cache(folder)[0], 16, 7)
    crossing = [i for i in range(len(ds)) if (7 * i) // 1000 != (7 * i + 16) // 1000]
    assert len(crossing) > 10
    for i in crossing:
        x, y = ds[i]
        assert x.tolist() == flat[7 * i : 7 * i + 16].tolist()
        assert y.tolist() == flat[7 * i + 1 : 7 * i + 17].tolist()


def test_max_tokens_caps_the_stream(tmp_path: Path, small_tasks: None) -> None:
    _write_docs(tmp_path / "docs")
    corpus = TextFiles(tmp_path / "docs")
    full_folder = build_token_cache(corpus, CharTokenizer(), tmp_path / "c", workers=2)
    full = _stream(full_folder)
    capped = build_token_cache(
        corpus, CharTokenizer(), tmp_path / "c", workers=2, shard_tokens=500, max_tokens=1234
    )
    assert capped != full_folder and capped.name == full_folder.name + "-max1234"
    meta = json.loads((capped / "meta.json").read_text())
    assert meta["total"] == 1234 and [s["tokens"] for s in meta["shards"]] == [500, 500, 234]
    assert np.array_equal(_stream(capped), full[:1234])
    more = build_token_cache(corpus, CharTokenizer(), tmp_path / "c", max_tokens=10**9)
    assert np.array_equal(_stream(more), full)  # a cap above the corpus takes all of it


class _TooSmallVocab(CharTokenizer):
    """Claims fewer ids than it makes: the cache must refuse what the model would index past."""

    @property
    def vocab_size(self) -> int:
        return 5


@pytest.mark.parametrize("workers", [1, 2])
def test_ids_beyond_the_vocab_are_refused(tmp_path: Path, workers: int) -> None:
    _write_docs(tmp_path / "docs", n=4)
    with pytest.raises(TokenIdError) as e:
        build_token_cache(
            TextFiles(tmp_path / "docs"), _TooSmallVocab(), tmp_path / "c", workers=workers
        )
    msg = str(e.value)
    assert "tokenizer 'char-" in msg and "corpus 'docs'" in msg and "vocab_size 5" in msg
    (folder,) = (tmp_path / "c").iterdir()
    assert not list(folder.glob("shard-*")) and not (folder / "meta.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files


def test_temp_files_of_a_killed_build_are_removed(tmp_path: Path, caplog) -> None:
    _write_docs(tmp_path / "docs", n=4)
    corpus = TextFiles(tmp_path / "docs")
    folder = build_token_cache(corpus, CharTokenizer(), tmp_path / "c", shard_tokens=50)
    good = _contents(folder)
    (folder / "meta.json").unlink()  # as a build killed before its end leaves the folder
    (folder / ".shard-000003.bin.k1ll3d.tmp").write_bytes(b"\0" * 10)
    with caplog.at_level("INFO"):
        assert ensure_token_cache(corpus, CharTokenizer(), tmp_path / "c", shard_tokens=50)[1]
    assert "removed the temp files of an interrupted build" in caplog.text
    assert _contents(folder) == good
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- kill, resume, lock

# A build in its own process: slow tokenizer, many tiny tasks and shards, two workers.
_CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from llm.data import TextFiles, chunking, ensure_token_cache
from _slow_tokenizer import SlowCharTokenizer
chunking.TASK_CHARS = 400
try:
    folder, built = ensure_token_cache(
        TextFiles(sys.argv[1]), SlowCharTokenizer(delay=float(sys.argv[3])), sys.argv[2],
        workers=2, shard_tokens=300,
    )
except KeyboardInterrupt as e:
    print(e, file=sys.stderr)
    sys.exit(130)
print(json.dumps({"built": built, "folder": str(folder)}))
"""
_CHILD_ENV = {**ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def _start_build(docs: Path, cache: Path, delay: float = 0.03, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(docs), str(cache), str(delay)],
        env={**_CHILD_ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the test can kill it, workers too
    )


def _finished_shards(cache: Path) -> int:
    try:
        (progress,) = cache.glob("*/progress.json")
        return len(json.loads(progress.read_text())["shards"])
    except (ValueError, OSError):  # not there yet, or being replaced
        return 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_until_stopped(proc: subprocess.Popen[str]) -> None:
    """Until ``proc`` stops itself (``LLM_FAULT=...:SIGSTOP``); fails if it ends instead."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):  # it ended (and is reaped now): say how
        proc.returncode = os.waitstatus_to_exitcode(status)
        pytest.fail(f"exited with {proc.returncode} before its kill point: {proc.communicate()}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_build_resumes_to_the_same_bytes(
    tmp_path: Path, sig: signal.Signals, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """SIGKILL (no cleanup at all) or SIGTERM (clean stop) after three shards were recorded
    (a kill point, not a race with the build); the next build resumes."""
    monkeypatch.setattr(chunking, "TASK_CHARS", 400)
    _write_docs(tmp_path / "docs", n=60)
    corpus = TextFiles(tmp_path / "docs")
    cache = tmp_path / "killed"
    # the main process only (os.kill of itself): its workers must not outlive it
    fault = {faults.ENV: f"prepare.shard_recorded@3:{sig.name}"}
    proc = _start_build(tmp_path / "docs", cache, delay=0.0, **fault)
    try:
        _, err = proc.communicate(timeout=120)
        deadline = time.monotonic() + 10  # PR_SET_PDEATHSIG kills them: only a bound
        while _group_alive(proc.pid):
            assert time.monotonic() < deadline, "tokenizer workers outlived their build"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    (folder,) = cache.iterdir()
    assert _finished_shards(cache) == 3 and not (folder / "meta.json").exists(), err
    first = (folder / "shard-000000.bin").stat().st_mtime_ns
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, err
        assert "interrupted by SIGTERM" in err, err
        assert "3 finished shards kept" in err, err
        assert "run the same command again to resume" in err
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files
    else:
        assert proc.returncode == -signal.SIGKILL, err

    with caplog.at_level("INFO"):
        resumed, built = ensure_token_cache(corpus, CharTokenizer(), cache, shard_tokens=300)
    assert built and resumed == folder
    assert "after its 3 finished shards" in caplog.text
    assert (folder / "shard-000000.bin").stat().st_mtime_ns == first  # kept, not rewritten
    straight = build_token_cache(corpus, CharTokenizer(), tmp_path / "straight", shard_tokens=300)
    assert _contents(folder) == _contents(straight)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_ctrl_c_during_prepare_cli_ends_with_a_message(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: workers ignore it, the CLI prints one message.

    The build stops itself (SIGSTOP) after two shards, so Ctrl-C comes mid-build however
    slowly this test runs; it is handled once the build continues."""
    _write_docs(tmp_path / "docs", n=60)
    argv = [
        "prepare",
        "data=text_files",
        f"data.path={tmp_path / 'docs'}",
        "data.shard_tokens=300",
        "data.tokenize_workers=2",
        "tokenizer=char",
        f"paths.data_dir={tmp_path}",
    ]
    script = (  # `llm prepare ...` with small tasks
        "import sys; from llm.data import chunking; chunking.TASK_CHARS = 400; "
        f"from llm.cli import main; sys.argv = ['llm', *{argv!r}]; sys.exit(main())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**_CHILD_ENV, faults.ENV: "prepare.shard_recorded@2:SIGSTOP"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    cache = tmp_path / "cache"
    try:
        _wait_until_stopped(proc)
        os.killpg(proc.pid, signal.SIGINT)  # pending until it runs again
        os.killpg(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("token cache build interrupted by SIGINT: ") and "resume" in last
    assert "Traceback" not in err and "token cache built" not in out
    (folder,) = cache.iterdir()
    assert _finished_shards(cache) == 2 and not (folder / "meta.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files


@pytest.mark.slow
def test_two_processes_build_the_cache_once(tmp_path: Path) -> None:
    _write_docs(tmp_path / "docs", n=40)
    cache = tmp_path / "cache"
    procs = [_start_build(tmp_path / "docs", cache) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["built"] for r in results) == [False, True]  # one built, one reused
    assert results[0]["folder"] == results[1]["folder"]
    assert check_cache(results[0]["folder"]) is None
    waited = outs[[r["built"] for r in results].index(False)][1]
    assert "another process is building" in waited or "reusing token cache" in waited


# ----------------------------------------------------------------------------- progress


def test_progress_logs_plain_lines_off_a_terminal(caplog) -> None:
    out = io.StringIO()  # not a terminal: log lines, nothing written to the stream
    p = BuildProgress("tokenizing x", total_bytes=4_000_000, stream=out, every=0)
    with caplog.at_level("INFO"):
        p.update(1_000_000, 250_000)
    p.close()
    line = caplog.records[-1].getMessage()
    assert line.startswith("tokenizing x: 1.00MB of 4.00MB (25.0%), ")
    assert "B/s" in line and "250k tokens" in line and "ETA" in line
    assert "\r" not in line and "\x1b" not in line and out.getvalue() == ""
    # a token cap gives the ETA when the corpus size is unknown (a stream)
    capped = BuildProgress("t", max_tokens=1_000_000, stream=out, every=0)
    capped.update(2_000_000, 500_000)
    assert "of 4.00MB (50.0%)" in capped.line() and "500k/1.00M tokens" in capped.line()
    both = BuildProgress("t", total_bytes=3_000_000, max_tokens=1_000_000, stream=out, every=0)
    both.update(2_000_000, 500_000)  # the corpus ends before the cap
    assert "of 3.00MB (66.7%)" in both.line()


def test_progress_draws_a_bar_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = BuildProgress("tokenizing x", total_bytes=4_000_000, stream=out)
    p.update(2_000_000, 500_000)
    p.close()
    assert "tokenizing x" in out.getvalue() and "50%" in out.getvalue()
    assert "B/s" in out.getvalue() and "500k tokens" in out.getvalue()


# ----------------------------------------------------------------------------- web corpora


@pytest.mark.slow  # importing datasets alone takes seconds
def test_fineweb_and_openwebtext_configs_read_local_files(tmp_path: Path) -> None:
    """The hub configs, pointed at local files with the hub datasets' columns."""
    import datasets
    from hydra.utils import instantiate

    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) for _ in range(12)]
    fineweb = tmp_path / "fineweb.parquet"
    rows = [
        {
            "text": t,
            "id": f"<urn:uuid:{i}>",
            "dump": "CC-MAIN-2024-10",
            "url": f"https://example.com/{i}",
            "file_path": "s3://x",
            "language": "en",
            "language_score": 0.9,
            "token_count": len(t),
            "score": 3.1,
            "int_score": 3,
        }
        for i, t in enumerate(texts)
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(fineweb))
    owt = tmp_path / "openwebtext.jsonl"
    owt.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    gpt2 = TiktokenTokenizer("gpt2")
    expected = _joined(gpt2, texts)

    hub = compose("train", ["data=fineweb_edu"]).data
    assert (hub.path, hub.corpus.name, hub.corpus.text_column) == (
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        "text",
    )
    assert hub.corpus.streaming and hub.corpus._target_ == "llm.data.HFDataset"
    hub = compose("train", ["data=openwebtext"]).data
    assert (hub.path, hub.corpus.text_column) == ("Skylion007/openwebtext", "text")
    for name, path in [("fineweb_edu", fineweb), ("openwebtext", owt)]:
        cfg = compose(
            "train",
            [
                f"data={name}",
                f"data.path={path}",
                "data.shard_tokens=100",
                "data.tokenize_workers=2",
                "model.block_size=8",
                f"paths.data_dir={tmp_path / name}",
            ],
        )
        dm = instantiate(cfg.data, tokenizer=TiktokenTokenizer("gpt2"))
        dm.prepare_data()
        dm.setup("fit")
        assert dm.cache_built and len(dm.meta["shards"]) > 3
        assert _stream(dm.cache_path).tolist() == expected, name


def test_data_config_keys(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    data = compose("train", []).data
    assert data.tokenize_workers is None and data.max_tokens is None
    assert data.shard_tokens == 100_000_000
    f = tmp_path / "t.txt"
    f.write_text("hello world\n" * 50, encoding="utf-8")
    cfg = compose(
        "train",
        [
            "data=text_files",
            f"data.path={f}",
            "data.tokenize_workers=1",
            "data.shard_tokens=64",
            "data.max_tokens=500",
            "model.block_size=8",
            f"paths.data_dir={tmp_path}",
        ],
    )
    dm = instantiate(cfg.data, tokenizer=CharTokenizer())
    dm.prepare_data()
    dm.setup("fit")
    assert dm.meta["total"] == 500 and len(dm.meta["shards"]) == 8
    assert len(dm.train_dataset.tokens) == 450 and len(dm.val_dataset.tokens) == 50
    from llm.data import TextDataModule

    for bad, msg in [
        ({"shard_tokens": 0}, "data.shard_tokens=0: must be an integer >= 1"),
        ({"max_tokens": 0}, "data.max_tokens=0: must be an integer >= 1 or null"),
        ({"tokenize_workers": 0}, "data.tokenize_workers=0: must be an integer >= 1 or null"),
    ]:
        with pytest.raises(ValueError, match=msg):
            TextDataModule(TextFiles(f), CharTokenizer(), 8, **bad)
