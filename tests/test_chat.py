"""`llm chat`: prompt templates, a session's KV cache across turns (only new tokens prefilled),
/reset, dropping whole earliest turns past the context, the piped transcript, and the reply
`llm generate` would give."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _hf_utils import CHAT_TEMPLATE, train_tokenizer
from helpers import ALPHABET, TINY, char_checkpoint, run_cli

from llm.chat import ChatSession, TurnRefused, fit_turns
from llm.prompts import format_prompt, render
from llm.tokenizers import CharTokenizer

EOT = "<|endoftext|>"


def _model(vocab_size: int, block_size: int, seed: int = 0) -> Any:
    from llm.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, **TINY))
    with torch.no_grad():  # peakier than the 0.02 init: replies differ from turn to turn
        model.lm_head.weight.normal_(std=0.5)
    return model.eval()


def _prefill_sizes(model: Any) -> tuple[list[int], Any]:
    """Records the length of every forward pass's input; returns (the list, the hook)."""
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].size(1)))
    return sizes, hook


def test_templates_render_a_conversation() -> None:
    tok = CharTokenizer()
    tok.fit([ALPHABET])
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    # alpaca: every exchange is a record (prompt, response, end-of-text), earlier ones first
    alpaca = render("alpaca", msgs, tok)
    assert alpaca == format_prompt({"instruction": "Hi"}) + "Hello" + EOT + format_prompt(
        {"instruction": "Bye"}
    )
    # none: the texts one after another; a reply keeps the end-of-text it stopped on
    assert render(None, msgs, tok) == "HiHelloBye"
    ended = [msgs[0], {**msgs[1], "ended": True}, msgs[2]]
    assert render(None, ended, tok) == "HiHello" + EOT + "Bye"
    # chat: the tokenizer's own Jinja template (here ChatML, as Qwen's)
    chatml = SimpleNamespace(
        chat_template=CHAT_TEMPLATE
        + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        special_tokens={},
        eos_token="<|im_end|>",
    )
    assert render("chat", msgs, chatml) == (  # type: ignore[arg-type]
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="template=chat needs a tokenizer with a chat template"):
        render("chat", msgs, tok)
    with pytest.raises(ValueError, match="'vicuna' is not a prompt template"):
        render("vicuna", msgs, tok)


def test_each_turn_prefills_only_its_new_tokens(char_tokenizer: CharTokenizer) -> None:
    tok = char_tokenizer
    model = _model(tok.vocab_size, block_size=512)
    session = ChatSession(model, tok, template="alpaca", max_new_tokens=8, temperature=0.0)
    sizes, hook = _prefill_sizes(model)
    try:
        first = "".join(session.send("Name a colour."))
        n1, after1 = len(sizes), len(session.ids)
        second = "".join(session.send("And another?"))
    finally:
        hook.remove()
    p1 = tok.encode(format_prompt({"instruction": "Name a colour."}))
    assert session.prefilled[0] == sizes[0] == len(p1)
    assert first == session.messages[1]["content"] and len(first) > 0
    # turn 2 runs the last reply token (sampled, never run yet) and its own new text, only
    ended = session.messages[1].get("ended", False)
    new = tok.encode(("" if ended else EOT) + format_prompt({"instruction": "And another?"}))
    assert session.ids[after1 : after1 + len(new)] == new
    assert session.prefilled[1] == sizes[n1] == 1 + len(new)
    assert set(sizes[1:n1] + sizes[n1 + 1 :]) == {1}  # then one token per step
    # the cached turn samples what a model reading the whole conversation afresh samples
    history = session.ids[: after1 + len(new)]
    fresh = model.generate(torch.tensor([history]), 8, temperature=0.0, stop_token=tok.eot_id)
    assert fresh[0, len(history) :].tolist() == session.ids[len(history) :]
    assert tok.decode([i for i in session.ids[len(history) :] if i != tok.eot_id]) == second


def test_reset_forgets_the_conversation_and_restarts_the_seed(char_tokenizer: Any) -> None:
    model = _model(char_tokenizer.vocab_size, block_size=128)
    session = ChatSession(model, char_tokenizer, max_new_tokens=10, seed=5)
    first = "".join(session.send("Hello"))
    "".join(session.send(" again"))
    assert session.prefilled == [5, 1 + len(" again")]
    session.reset()
    assert session.messages == [] and session.ids == [] and session.cache.length == 0
    assert "".join(session.send("Hello")) == first  # same seed stream, same first reply
    assert session.prefilled[-1] == 5


def test_fit_turns_drops_whole_earliest_turns(char_tokenizer: CharTokenizer) -> None:
    tok = char_tokenizer

    def ids(text: str) -> list[int]:
        return [tok.encode(c)[0] for c in text]

    msgs = [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "cd", "ended": True},
        {"role": "user", "content": "ef"},
        {"role": "assistant", "content": "gh"},
        {"role": "user", "content": "ij"},
    ]  # renders as ab cd<eot> ef gh ij: 11 tokens
    whole = [*ids("abcd"), tok.eot_id, *ids("efghij")]
    assert fit_turns(None, msgs, tok, 11) == (msgs, "abcd" + EOT + "efghij", whole)
    # at 8, a cut at the token level would keep "d<eot>efghij": the whole exchange goes instead
    for room in (10, 8, 6):
        assert fit_turns(None, msgs, tok, room) == (msgs[2:], "efghij", ids("efghij"))
    assert fit_turns(None, msgs, tok, 5) == (msgs[4:], "ij", ids("ij"))
    with pytest.raises(TurnRefused, match="this turn is 2 tokens once rendered; the context "
                       "has room for 1 beside what it keeps for the reply"):  # fmt: skip
        fit_turns(None, msgs, tok, 1)
    # a system message stays, whatever goes
    tok.chat_template = "{% for m in messages %}{{ m.role[0] }}:{{ m.content }};{% endfor %}"
    system = [{"role": "system", "content": "S"}]
    kept, text, kept_ids = fit_turns("chat", system + msgs, tok, 12)
    assert (kept, text, kept_ids) == (system + msgs[4:], "s:S;u:ij;", ids("s:S;u:ij;"))
    assert fit_turns("chat", system + msgs, tok, 19)[1] == "s:S;u:ef;a:gh;u:ij;"


def test_a_long_conversation_drops_whole_turns_with_one_note(char_tokenizer: Any) -> None:
    """Over a 40-token context the prompt fed to the model is always whole turns (the first
    dropped ones gone), and the note comes once, at the first drop."""
    tok = char_tokenizer
    model = _model(tok.vocab_size, block_size=40)
    fed: list[list[int]] = []
    hook = model.register_forward_pre_hook(lambda _, args: fed.append(args[0][0].tolist()))
    notes: list[str] = []
    session = ChatSession(model, tok, max_new_tokens=8, temperature=0.0, notify=notes.append)
    turns = [f"turn {n} words " for n in range(8)]
    drops = 0
    try:
        for n, text in enumerate(turns):
            before, dropped = len(fed), session.dropped
            reply = "".join(session.send(text))
            assert len(session.ids) <= 40 and session.messages[-1]["content"] == reply
            users = [m["content"] for m in session.messages if m["role"] == "user"]
            assert users == turns[n - len(users) + 1 : n + 1]  # the latest turns, whole
            if session.dropped > dropped:  # the kept turns are read again, from a turn's start
                prompt = render(None, session.messages[:-1], tok)
                assert prompt.startswith(users[0]) and fed[before] == tok.encode(prompt)
                drops += 1
    finally:
        hook.remove()
    assert drops >= 2 and users[0] != turns[0]
    assert notes == [
        "context full: dropped the earliest turns (the context holds 40 tokens, 8 of them kept "
        "for the reply); later turns are dropped without a note"
    ]
    session.reset()  # a new conversation: its first drop is noted again
    for text in turns[:4]:
        "".join(session.send(text))
    assert len(notes) == 2


def test_a_turn_longer_than_the_context_is_refused_whole(char_tokenizer: Any) -> None:
    model = _model(char_tokenizer.vocab_size, block_size=32)
    notes: list[str] = []
    session = ChatSession(model, char_tokenizer, max_new_tokens=8, seed=0, notify=notes.append)
    "".join(session.send("hi"))
    before = (list(session.messages), list(session.ids))
    with pytest.raises(TurnRefused, match="this turn is 100 tokens once rendered; the context "
                       "has room for 24 beside"):  # fmt: skip
        session.send("x" * 100)
    assert (session.messages, session.ids) == before and notes == []  # as it was
    "".join(session.send(" more"))
    assert [m["content"] for m in session.messages[::2]] == ["hi", " more"]


def test_an_interrupted_reply_is_kept_and_the_next_turn_reads_all_again(
    char_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C may land inside a forward pass and tear the cache: it is dropped, not trusted."""
    import llm.chat

    model = _model(char_tokenizer.vocab_size, block_size=128)
    session = ChatSession(model, char_tokenizer, max_new_tokens=10, seed=1)
    real = llm.chat.generate_stream
    ab = [char_tokenizer.encode(c)[0] for c in "ab"]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        yield from (torch.tensor([[i]]) for i in ab)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.chat, "generate_stream", interrupted)
    pieces: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        pieces.extend(session.send("Hello"))
    assert pieces == ["a", "b"] and session.messages[-1] == {"role": "assistant", "content": "ab"}
    assert session.cache.length == 0
    monkeypatch.setattr(llm.chat, "generate_stream", real)
    "".join(session.send(" more"))
    assert session.prefilled == [5, len("Hello") + 2 + len(" more")]


def test_hf_tokenizer_chat_template_session(tmp_path: Path) -> None:
    """tokenizer=hf models: the chat template, <|im_end|> ends a reply, the cache is reused."""
    import json

    from llm.tokenizers import HFTokenizer

    folder = train_tokenizer(tmp_path / "tok")
    template = CHAT_TEMPLATE + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    config = {"chat_template": template, "eos_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(folder)
    model = _model(tok.vocab_size, block_size=256)
    session = ChatSession(model, tok, template="chat", system="Be brief.", max_new_tokens=6)
    "".join(session.send("hello there"))
    "".join(session.send("how are you?"))
    first = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
    assert session.prefilled[0] == len(tok.encode(first + "<|im_start|>assistant\n"))
    ended = session.messages[2].get("ended", False)  # [system, user, assistant, ...]
    new = ("\n" if ended else "<|im_end|>\n") + (
        "<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert session.prefilled[1] == 1 + len(tok.encode(new))  # system and turn 1 stay cached
    with pytest.raises(ValueError, match="system= needs template=chat"):
        ChatSession(model, tok, template="alpaca", system="Be brief.")


@pytest.mark.slow
def test_chat_reply_equals_llm_generate(
    tmp_path: Path,
    llm_main: Any,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One prompt: the reply is what `llm generate` samples from the rendered prompt with the
    same seed and settings (chat stops at end-of-text, which it does not print)."""
    from llm.checkpoint import load_language_model, save_checkpoint
    from llm.training.module import GPTLitModule

    tok = CharTokenizer()
    tok.fit([ALPHABET])
    torch.manual_seed(0)
    module = GPTLitModule(
        model={**TINY, "block_size": 256, "vocab_size": tok.vocab_size},
        tokenizer=tok.to_dict(),
        template="alpaca",
    )
    ckpt = save_checkpoint(module, tmp_path / "instruct.ckpt")
    assert load_language_model(ckpt).template == "alpaca"
    settings = ["max_new_tokens=40", "temperature=0.9", "top_k=20", "seed=4"]

    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hi\n/quit\nnever read\n"))
    assert llm_main("chat", f"ckpt_path={ckpt}", *settings) == 0
    transcript = capsys.readouterr().out

    rendered = format_prompt({"instruction": "Say hi"})
    (tmp_path / "prompt.txt").write_text(rendered, encoding="utf-8")
    assert llm_main("generate", f"ckpt_path={ckpt}", f"prompt_file={tmp_path / 'prompt.txt'}",
                    *settings) == 0  # fmt: skip
    generated = capsys.readouterr().out
    assert generated.startswith(rendered)
    continuation = generated[len(rendered) :].removesuffix("\n").split(EOT)[0]
    assert transcript == f"> Say hi\n{continuation}\n" and len(continuation) > 0


def test_chat_commands_and_template_override(
    trained: dict[str, Any],
    llm_main: Any,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = "First\n/reset\nFirst\n/help\n\n"  # /help is unknown; an empty line is skipped
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))  # ends without /quit: end of input
    args = (f"ckpt_path={trained['ckpt']}", "max_new_tokens=12", "template=none")
    assert llm_main("chat", *args) == 0
    captured = capsys.readouterr()
    first, second = captured.out.split("\n\n> ")  # two turns, a blank line between
    assert first + "\n" == "> " + second  # /reset restarts the seed's stream
    assert first.startswith("> First\n") and len(first) > len("> First\n")
    assert "[new conversation]" in captured.err and "unknown command /help" in captured.err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert llm_main("chat", *args[:1], "template=chat") == 1
    assert "needs a tokenizer with a chat template" in capsys.readouterr().err


def test_piped_chat_prints_a_transcript(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Piped, stdout is the conversation: each turn "> " and its line, then the reply, a blank
    line between turns; a skipped line and the commands are not in it, and the note on dropped
    turns comes once, on stderr."""
    from llm.checkpoint import load_language_model

    ckpt = char_checkpoint(tmp_path / "base.ckpt", block_size=32)
    lines = ["Hello there", "how are you ☺", "fine words", "/reset", "again now", "more words",
             "and then some", "last one"]  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    settings = {"max_new_tokens": 6, "temperature": 1.0, "top_k": None, "seed": 3}
    args = [f"{k}={'null' if v is None else v}" for k, v in settings.items()]
    assert llm_main("chat", f"ckpt_path={ckpt}", "template=none", *args) == 0
    captured = capsys.readouterr()

    lm = load_language_model(ckpt)
    session = ChatSession(lm.model, lm.tokenizer, notify=lambda _: None, **settings)  # type: ignore[arg-type]
    turns = []
    for line in lines:
        if line == "/reset":
            session.reset()
        elif "☺" not in line:  # the char vocabulary has no ☺: that line is skipped
            turns.append(f"> {line}\n" + "".join(session.send(line)) + "\n")
    assert captured.out == "\n".join(turns)
    assert [x[2:] for x in captured.out.splitlines() if x.startswith("> ")] == [
        x for x in lines if x != "/reset" and "☺" not in x
    ]
    notes = captured.err.splitlines()
    assert notes[0].startswith("[line skipped: the tokenizer cannot read this line")
    assert notes[1:] == [
        "[context full: dropped the earliest turns (the context holds 32 tokens, 6 of them kept "
        "for the reply); later turns are dropped without a note]",
        "[new conversation]",
        "[context full: dropped the earliest turns (the context holds 32 tokens, 6 of them kept "
        "for the reply); later turns are dropped without a note]",
    ]


@pytest.mark.slow
def test_piped_chat_exits_0(trained: dict[str, Any]) -> None:
    proc = run_cli("chat", f"ckpt_path={trained['ckpt']}", "max_new_tokens=10",
                   stdin="Hello\n/quit\n")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("> Hello\n") and proc.stdout.endswith("\n")
    assert len(proc.stdout) > len("> Hello\n\n")


def test_a_byte_that_is_not_utf8_does_not_end_the_session(
    trained: dict[str, Any],
    llm_main: Any,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Latin-1 bytes piped in are read as U+FFFD; a char vocabulary without it skips that line
    with a note (the conversation as it was), and the next line gets its reply."""
    args = (f"ckpt_path={trained['ckpt']}", "max_new_tokens=6", "template=none")
    runs = []
    for raw in (b"caf\xe9 au lait\nHello\n/quit\n", b"Hello\n/quit\n"):
        stdin = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")
        monkeypatch.setattr(sys, "stdin", stdin)
        assert llm_main("chat", *args) == 0
        runs.append(capsys.readouterr())
    assert runs[0].err.splitlines() == [
        "[bytes that are not UTF-8 were read as \ufffd]",
        "[line skipped: the tokenizer cannot read this line: unknown character '\ufffd' at "
        "position 3: not in the fitted vocabulary (configure unk_token to map unknown characters)]",
    ]
    assert runs[0].out == runs[1].out and runs[0].out.strip()  # as if "Hello" came alone


def test_a_turn_the_tokenizer_cannot_read_leaves_the_conversation_as_it_was(
    char_tokenizer: CharTokenizer,
) -> None:
    from llm.chat import TurnRefused

    session = ChatSession(_model(char_tokenizer.vocab_size, 64), char_tokenizer,
                          max_new_tokens=4, seed=0)  # fmt: skip
    with pytest.raises(TurnRefused, match="unknown character '☺'"):
        list(session.send("hi ☺"))
    assert session.messages == [] and session.ids == []
    reply = "".join(session.send("hi"))  # the refused turn left nothing behind it
    assert session.messages[0] == {"role": "user", "content": "hi"}
    assert len(session.messages) == 2 and session.messages[1]["content"] == reply
    assert session.ids[:2] == char_tokenizer.encode("hi") and len(session.ids) <= 2 + 4


@pytest.mark.slow
def test_piped_bytes_that_are_not_utf8_keep_the_session_going(trained: dict[str, Any]) -> None:
    """The real standard input of `llm chat`, fed bytes (not text) through a pipe."""
    import subprocess

    from helpers import ENV, ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "llm", "chat", f"ckpt_path={trained['ckpt']}",
         "max_new_tokens=6", "template=none"],
        input=b"\xff\xfe bad\nHello\n/quit\n", capture_output=True, cwd=ROOT, env=ENV,
        timeout=300,
    )  # fmt: skip
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "line skipped" in err and "Traceback" not in err and "codec" not in err
    assert proc.stdout.strip()  # "Hello" got its reply
