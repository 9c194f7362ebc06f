"""``llm tokenize tokenizer=gpt2 text="hi there"``: how a tokenizer splits a text."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from llm.cli.app import hydra_app, read_free_text

if TYPE_CHECKING:
    from llm.tokenizers import Tokenizer

# Alternating background colours (256-colour ANSI), like tiktokenizer's token view.
_BACKGROUNDS = (153, 186, 217, 151, 223, 183)
_RESET = "\x1b[0m"


def _visible(piece: str) -> str:
    """Escape whitespace that would otherwise hide token boundaries."""
    return piece.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def render(tokenizer: Tokenizer, text: str, color: bool) -> str:
    """Ids, count, decoded text and the token pieces (coloured, or `|`-delimited when plain)."""
    ids = tokenizer.encode(text)
    pieces = [_visible(p) for p in tokenizer.pieces(ids)]
    if color:
        shown = "".join(
            f"\x1b[30;48;5;{_BACKGROUNDS[i % len(_BACKGROUNDS)]}m{p}{_RESET}"
            for i, p in enumerate(pieces)
        )
    else:
        shown = "|" + "|".join(pieces) + "|"
    return "\n".join(
        [
            f"tokenizer: {tokenizer.identity()} (vocab_size={tokenizer.vocab_size})",
            f"ids: {ids}",
            f"count: {len(ids)}",
            f"decoded: {tokenizer.decode(ids)}",
            f"pieces: {shown}",
        ]
    )


def use_color(flag: bool | None = None) -> bool:
    """Colour only for a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if flag is not None:
        return bool(flag)
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


@hydra_app("tokenize")
def main(cfg: DictConfig) -> None:
    """Fit the tokenizer first if it learns its vocabulary (on fit_on, else the text)."""
    import hydra

    from llm.data.corpus import read_utf8

    tokenizer: Tokenizer = hydra.utils.instantiate(cfg.tokenizer)
    text = read_free_text(cfg, "text")
    if tokenizer.needs_fit:
        fit_on = cfg.get("fit_on")
        tokenizer.fit([read_utf8(str(fit_on)) if fit_on else text])
    print(render(tokenizer, text, use_color(cfg.get("color"))))
