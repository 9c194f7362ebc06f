"""``llm chat ckpt_path=...``: talk to a checkpoint in the terminal, one line per turn.

Replies stream as they are sampled; ``/reset`` starts a new conversation, ``/quit`` (or end of
input) ends the session, Ctrl-C stops a reply (and, at the prompt, the session). Piped input
or output (``printf 'Hello\\n/quit\\n' | llm chat ckpt_path=... > chat.txt``) gives a
transcript: each turn as ``> `` and the line, then the reply, a blank line between turns. Notes
(``[...]``: dropped turns, skipped lines, /reset) go to standard error, so standard output
holds the conversation only.
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig

from llm.cli.app import hydra_app, resolve_device, sampling_settings

COMMANDS = "/reset clears the conversation, /quit ends the session"


def _note(message: str) -> None:
    print(f"[{message}]", file=sys.stderr, flush=True)


def _template(cfg: DictConfig, lm: Any) -> str | None:
    """``template=auto`` is the checkpoint's own; ``none`` is a base model's plain text."""
    choice = str(cfg.template) if cfg.template is not None else "none"
    if choice == "auto":
        return lm.template
    return None if choice == "none" else choice


def _tolerate_bad_bytes() -> None:
    """A byte that is not UTF-8 (Latin-1 text pasted in, a stray binary byte) is read as U+FFFD
    rather than ending the session with a codec error; the line it is in is noted."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)  # a TextIOWrapper's, not a StringIO's
    if reconfigure is not None:
        reconfigure(errors="replace")


def _read_line(interactive: bool) -> str | None:
    """One line of input (None at its end); the terminal gets a prompt and line editing."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    if sys.stdin.isatty():  # typed, the output redirected: the prompt shows, the file stays clean
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


@hydra_app("chat")
def main(cfg: DictConfig) -> int:
    """Load the checkpoint, then read a line, stream the reply, until /quit or end of input."""
    from llm.chat import ChatSession, TurnRefused
    from llm.checkpoint import load_language_model

    settings = sampling_settings(cfg)
    lm = load_language_model(cfg.ckpt_path, resolve_device(str(cfg.device)))
    template = _template(cfg, lm)
    session = ChatSession(
        lm.model,
        lm.tokenizer,
        template=template,
        system=None if cfg.system is None else str(cfg.system),
        notify=_note,
        **settings,
    )
    _tolerate_bad_bytes()
    # a terminal each side: a prompt, the typed line is on screen already. Else a transcript
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    turns = 0
    if sys.stdin.isatty():
        _note(
            f"template: {template or 'none (the model continues your text)'}; context "
            f"{session.block_size} tokens; {COMMANDS}"
        )
    while (line := _read_line(interactive)) is not None:
        command = line.strip()
        if command == "/quit":
            break
        if command == "/reset":
            session.reset()
            _note("new conversation")
            continue
        if command.startswith("/"):
            _note(f"unknown command {command}; {COMMANDS}")
            continue
        if not command:
            continue
        if "\ufffd" in line:
            _note("bytes that are not UTF-8 were read as \ufffd")
        try:
            reply = session.send(line)
        except TurnRefused as e:  # nothing was sampled; the conversation is as it was
            _note(f"line skipped: {e}")
            continue
        if not interactive:  # the transcript: a blank line between turns, the line, the reply
            print(("\n" if turns else "") + f"> {line}", flush=True)
            turns += 1
        try:
            for piece in reply:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(flush=True)
            _note("reply stopped")
            continue
        print(flush=True)
    return 0
