"""Tokenizer layer: round trips, errors, persistence, pickling, Hydra configs and the CLI."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiktoken
from helpers import SHAKESPEARE
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm.cli.tokenize import render
from llm.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EOT = "<|endoftext|>"
SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
)
TEXT_CORPUS = SAMPLE * 20 + "Some numbers 12345 and symbols: @#$%^&*() àéîõü 日本語 🙂\n"
AGI = "we are building an agi"
AGI_IDS = [854, 553, 6282, 448, 1017, 72]
# Module-scoped fixtures are fitted once; reusing them across examples is intended.
PROPERTY = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _shakespeare() -> Path | None:
    return SHAKESPEARE if SHAKESPEARE.is_file() else None


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    tok = CharTokenizer()
    tok.fit([SAMPLE])
    return tok


@pytest.fixture(scope="module")
def bpe_tok() -> BPETokenizer:
    tok = BPETokenizer(vocab_size=300)
    tok.fit([TEXT_CORPUS])
    return tok


@pytest.fixture(scope="module")
def o200k() -> TiktokenTokenizer:
    return TiktokenTokenizer("o200k_base")


# ------------------------------------------------------------------ tiktoken
def test_o200k_example(o200k: TiktokenTokenizer) -> None:
    assert o200k.encode(AGI) == AGI_IDS
    assert o200k.decode(AGI_IDS) == AGI
    assert o200k.encode_to_array(AGI).dtype == np.int64
    assert o200k.encode_to_array(AGI).tolist() == AGI_IDS


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base", "o200k_base", "r50k_base"])
def test_tiktoken_round_trip_and_specials(name: str) -> None:
    tok = TiktokenTokenizer(name)
    text = f"Hello, world!{EOT}Second doc\n\n  indented"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id is not None and tok.eot_id in ids
    assert tok.special_tokens[EOT] == tok.eot_id
    assert max(ids) < tok.vocab_size
    assert tok.encode_batch([text, AGI], num_threads=2) == [ids, tok.encode(AGI)]
    assert "".join(tok.pieces(ids)) == text
    assert not tok.needs_fit
    assert tok.identity() == name


def test_gpt2_eot_and_vocab() -> None:
    tok = TiktokenTokenizer("gpt2")
    assert tok.eot_id == 50256
    assert tok.vocab_size == 50257


def test_unknown_tiktoken_name_lists_encodings() -> None:
    with pytest.raises(ValueError) as e:
        TiktokenTokenizer("no_such_encoding")
    for name in tiktoken.list_encoding_names():
        assert name in str(e.value)


def test_offline_failure_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty cache and no network must give an actionable error, never a download."""
    import tiktoken.load
    import tiktoken.registry

    def no_network(*args: object, **kwargs: object) -> None:
        raise ConnectionError("network disabled in tests")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tok = TiktokenTokenizer("gpt2")  # lazy: constructing needs no files
    with pytest.raises(RuntimeError) as e:
        tok.encode("hello")
    assert "gpt2" in str(e.value)
    assert "TIKTOKEN_CACHE_DIR" in str(e.value)


def test_tiktoken_get_encoding_failure_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(name: str) -> None:
        raise OSError("cannot reach openaipublic.blob.core.windows.net")

    monkeypatch.setattr(tiktoken, "get_encoding", boom)
    with pytest.raises(RuntimeError, match=r"cl100k_base.*TIKTOKEN_CACHE_DIR"):
        _ = TiktokenTokenizer("cl100k_base").vocab_size


def test_tiktoken_full_corpus_count() -> None:
    path = _shakespeare()
    if path is None:
        pytest.skip("tiny shakespeare not available")
    text = path.read_text(encoding="utf-8")
    assert len(TiktokenTokenizer("gpt2").encode_to_array(text)) == 338_025


# ---------------------------------------------------------------------- char
def test_char_vocab_and_round_trip(char_tok: CharTokenizer) -> None:
    chars = sorted(set(SAMPLE))
    assert char_tok.chars == chars
    assert char_tok.vocab_size == len(chars) + 1
    assert char_tok.eot_id == len(chars)
    ids = char_tok.encode(SAMPLE)
    assert ids[:3] == [chars.index(c) for c in SAMPLE[:3]]
    assert char_tok.decode(ids) == SAMPLE
    arr = char_tok.encode_to_array(SAMPLE)
    assert arr.dtype == np.int64 and arr.ndim == 1 and arr.tolist() == ids


def test_char_specials_encoded(char_tok: CharTokenizer) -> None:
    text = f"speak{EOT}hear{EOT}"
    ids = char_tok.encode(text)
    assert ids.count(char_tok.eot_id) == 2
    assert len(ids) == len("speak") + len("hear") + 2
    assert char_tok.decode(ids) == text
    assert char_tok.encode(EOT) == [char_tok.eot_id]
    assert char_tok.encode("") == []


def test_char_unknown_character_error(char_tok: CharTokenizer) -> None:
    with pytest.raises(ValueError) as e:
        char_tok.encode(f"hear{EOT}me Z")
    assert "'Z'" in str(e.value)
    assert "position 20" in str(e.value)
    with pytest.raises(ValueError, match=r"'🙂'.*position 1"):
        char_tok.encode("a🙂")


def test_char_unk_token() -> None:
    tok = CharTokenizer(special_tokens=[EOT], unk_token="<unk>")
    tok.fit(["abc", "cab"])
    unk = tok.special_tokens["<unk>"]
    assert tok.chars == ["a", "b", "c"]
    assert tok.vocab_size == 5
    assert tok.encode("axb🙂") == [0, unk, 1, unk]
    assert tok.decode(tok.encode("abc")) == "abc"


def test_char_fit_iterable_and_specials_not_in_alphabet() -> None:
    tok = CharTokenizer()
    tok.fit(iter(["ab", f"c{EOT}", "ba"]))
    assert tok.chars == ["a", "b", "c"]


def test_char_encode_before_fit() -> None:
    tok = CharTokenizer()
    assert tok.needs_fit
    with pytest.raises(RuntimeError, match="fit"):
        tok.encode("abc")


def test_char_identity_depends_on_config_only() -> None:
    a, b = CharTokenizer(), CharTokenizer()
    b.fit(["xyz"])
    assert a.identity() == b.identity()
    assert a.identity().startswith("char-")
    assert CharTokenizer(unk_token="?").identity() != a.identity()


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda: CharTokenizer(special_tokens=[EOT, ""]), "special_tokens"),
        (lambda: CharTokenizer(unk_token=""), "unk_token"),
        (lambda: BPETokenizer(vocab_size=300, special_tokens=[""]), "special_tokens"),
        (lambda: tokenizer_from_dict({"kind": "char", "special_tokens": [""]}), "special_tokens"),
    ],
)
def test_empty_special_token_rejected(make, arg: str) -> None:
    """An empty special matches everywhere (char: its id between every char; BPE: hangs)."""
    with pytest.raises(ValueError, match="special tokens must be non-empty strings") as e:
        make()
    assert arg in str(e.value)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from([*sorted(set(SAMPLE)), EOT])).map("".join))
def test_char_round_trip_property(char_tok: CharTokenizer, text: str) -> None:
    assert char_tok.decode(char_tok.encode(text)) == text


def test_char_vectorised_path_on_shakespeare() -> None:
    """The token cache's fast path gives each character its sorted-alphabet id (its speed is
    measured by scripts/bench_data.py, not here)."""
    path = _shakespeare()
    if path is None:
        pytest.skip("tiny shakespeare not available")
    text = path.read_text(encoding="utf-8")
    tok = CharTokenizer()
    tok.fit([text])
    assert tok.vocab_size == 65 + 1
    ids = tok.encode_to_array(text)
    alphabet = sorted(set(text))
    assert len(ids) == len(text) and ids[:5].tolist() == [alphabet.index(c) for c in text[:5]]
    assert tok.decode(ids.tolist()) == text


# ----------------------------------------------------------------------- bpe
def test_bpe_vocab_size_and_round_trip(bpe_tok: BPETokenizer) -> None:
    assert bpe_tok.vocab_size == 300
    assert bpe_tok.eot_id == 299
    text = f"First Citizen:\nSpeak, speak.{EOT}日本語 🙂"
    ids = bpe_tok.encode(text)
    assert bpe_tok.decode(ids) == text
    assert max(ids) < bpe_tok.vocab_size
    assert ids.count(bpe_tok.eot_id) == 1
    assert len(bpe_tok.encode(SAMPLE)) < len(SAMPLE.encode())  # merges compress
    assert bpe_tok.encode_batch([text, SAMPLE]) == [ids, bpe_tok.encode(SAMPLE)]


def test_bpe_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="256"):
        BPETokenizer(vocab_size=256)


def test_bpe_encode_before_fit() -> None:
    tok = BPETokenizer(vocab_size=260)
    assert tok.needs_fit
    with pytest.raises(RuntimeError, match="fit"):
        tok.encode("abc")


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text())
def test_bpe_round_trip_property(bpe_tok: BPETokenizer, text: str) -> None:
    assert bpe_tok.decode(bpe_tok.encode(text)) == text


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text())
def test_tiktoken_round_trip_property(o200k: TiktokenTokenizer, text: str) -> None:
    assert o200k.decode(o200k.encode(text)) == text


def test_bpe_trains_on_shakespeare() -> None:
    path = _shakespeare()
    if path is None:
        pytest.skip("tiny shakespeare not available")
    text = path.read_text(encoding="utf-8")
    tok = BPETokenizer(vocab_size=4096)
    tok.fit([text])
    assert tok.vocab_size == 4096
    assert tok.decode(tok.encode(text[:10_000])) == text[:10_000]


# ------------------------------------------------------- persistence/pickle
def _all_fitted(char_tok: Tokenizer, bpe_tok: Tokenizer, o200k: Tokenizer) -> list[Tokenizer]:
    unk = CharTokenizer(unk_token="<unk>")
    unk.fit([SAMPLE])
    return [char_tok, unk, bpe_tok, o200k, TiktokenTokenizer("gpt2")]


def _plain(obj: object) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (str, int, bool))


def test_save_load_and_dict_round_trip(
    char_tok: CharTokenizer, bpe_tok: BPETokenizer, o200k: TiktokenTokenizer, tmp_path: Path
) -> None:
    text = "First Citizen:\nhear me speak." + EOT
    for i, tok in enumerate(_all_fitted(char_tok, bpe_tok, o200k)):
        d = tok.to_dict()
        assert _plain(d), d
        assert d["kind"] == tok.kind
        path = tmp_path / f"t{i}" / "tokenizer.json"
        tok.save(path)
        assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no tmp left
        for other in (tokenizer_from_dict(d), load_tokenizer(path)):
            assert type(other) is type(tok)
            assert other.encode(text) == tok.encode(text)
            assert other.vocab_size == tok.vocab_size
            assert other.special_tokens == tok.special_tokens
            assert other.identity() == tok.identity()


def test_save_is_one_line_of_utf8_json(tmp_path: Path) -> None:
    """save goes through llm.io.atomic_write_json: compact, non-ASCII kept, newline-terminated."""
    tok = CharTokenizer()
    tok.fit(["日本 ab"])
    path = tmp_path / "deep" / "tokenizer.json"
    tok.save(path)
    raw = path.read_bytes()
    assert raw.endswith(b"}\n") and raw.count(b"\n") == 1
    assert "日".encode() in raw and b"\\u" not in raw
    assert load_tokenizer(path).chars == tok.chars
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]


def test_torch_weights_only_checkpoint(bpe_tok: BPETokenizer, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"tokenizer": bpe_tok.to_dict()}, tmp_path / "ckpt.pt")
    d = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert tokenizer_from_dict(d).encode(SAMPLE) == bpe_tok.encode(SAMPLE)


def test_unfitted_to_dict_round_trip() -> None:
    for tok in (CharTokenizer(), BPETokenizer(vocab_size=512)):
        back = tokenizer_from_dict(tok.to_dict())
        assert back.needs_fit and back.identity() == tok.identity()


def test_pickling(char_tok: CharTokenizer, bpe_tok: BPETokenizer, o200k: TiktokenTokenizer) -> None:
    for tok in _all_fitted(char_tok, bpe_tok, o200k):
        ids = tok.encode(SAMPLE)  # forces the lazy Encoding to load before pickling
        back = pickle.loads(pickle.dumps(tok))
        assert back.encode(SAMPLE) == ids


def test_a_loaded_encoding_is_not_pickled(bpe_tok: BPETokenizer) -> None:
    """DataLoader workers and spawned ranks get the tokenizer pickled: the encoding this
    process loaded (a Rust object, rebuilt there on first use) adds nothing to the pickle."""
    for tok in (TiktokenTokenizer("o200k_base"), tokenizer_from_dict(bpe_tok.to_dict())):
        cold = len(pickle.dumps(tok))
        tok.encode(SAMPLE)  # loads the encoding
        assert len(pickle.dumps(tok)) == cold


# --------------------------------------------------------------------- hydra
TOKENIZER_OPTIONS = sorted(p.stem for p in (CONF / "tokenizer").glob("*.yaml"))


def test_config_options_exist() -> None:
    expected = {"char", "gpt2", "cl100k_base", "o200k_base", "tiktoken", "bpe"}
    assert expected <= set(TOKENIZER_OPTIONS)


@pytest.mark.parametrize("option", TOKENIZER_OPTIONS)
def test_compose_and_instantiate(option: str, tmp_path: Path) -> None:
    from _hf_utils import train_tokenizer

    # tokenizer=hf reads a model folder's tokenizer.json: one trained here
    path = [f"tokenizer.path={train_tokenizer(tmp_path)}"] if option == "hf" else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="tokenize", overrides=[f"tokenizer={option}", "text=hi", *path])
    tok = instantiate(cfg.tokenizer)
    assert isinstance(tok, Tokenizer)
    if tok.needs_fit:
        tok.fit([SAMPLE])
    assert tok.decode(tok.encode("hear me")) == "hear me"


def test_compose_generic_tiktoken_name() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="tokenize",
            overrides=["tokenizer=tiktoken", "tokenizer.name=p50k_base", "text=hi"],
        )
    tok = instantiate(cfg.tokenizer)
    assert tok.identity() == "p50k_base"


def test_unknown_option_lists_available() -> None:
    with (
        initialize_config_dir(config_dir=str(CONF), version_base="1.3"),
        pytest.raises(MissingConfigException) as e,
    ):
        compose(config_name="tokenize", overrides=["tokenizer=foo", "text=hi"])
    for option in TOKENIZER_OPTIONS:
        assert option in str(e.value)


# ----------------------------------------------------------------------- cli
def test_render_plain(o200k: TiktokenTokenizer) -> None:
    out = render(o200k, AGI, color=False)
    assert str(AGI_IDS) in out
    assert "count: 6" in out
    assert f"decoded: {AGI}" in out
    assert "|we| are| building| an| ag|i|" in out
    assert "\x1b[" not in out


def test_render_color(char_tok: CharTokenizer) -> None:
    out = render(char_tok, "hear\nme", color=True)
    assert "\x1b[" in out and "\x1b[0m" in out
    assert "\\n" in out  # newlines are shown, not printed raw inside the pieces line


def test_cli_end_to_end(llm_main: Any, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert llm_main("tokenize", "tokenizer=o200k_base", f"text={AGI}") == 0
    out = capsys.readouterr().out
    assert str(AGI_IDS) in out
    assert "|we| are| building| an| ag|i|" in out
