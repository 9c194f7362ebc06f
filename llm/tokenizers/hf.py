"""A Hugging Face tokenizer.json (Llama, Qwen3, ...) through the `tokenizers` library.

So a model loaded from a Hugging Face folder is finetuned with its own vocabulary and chat
special tokens, behind the same Tokenizer interface as the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from llm.io import read_json
from llm.tokenizers.base import EOT, Tokenizer, short_hash

# End-of-text names to fall back on when tokenizer_config.json names no eos_token.
_EOS_NAMES = (EOT, "<|end_of_text|>", "</s>")


def _token_text(token: Any) -> str | None:
    """tokenizer_config.json writes a token as its text or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


class HFTokenizer(Tokenizer):
    """A pretrained Hugging Face fast tokenizer, read from `path`: a folder holding
    tokenizer.json (and, if present, tokenizer_config.json / chat_template.jinja for the
    eos token and chat template), or the tokenizer.json file itself.

    `to_dict` carries the whole tokenizer.json text, so a checkpoint rebuilds it offline under
    `torch.load(weights_only=True)`. Text is encoded as is: no BOS is added (chat templates
    write theirs), and special tokens written in the text become their ids.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {path}: tokenizer.path must be a Hugging Face model folder "
                "holding tokenizer.json, or that file"
            )
        folder = file.parent
        settings: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            settings = read_json(folder / "tokenizer_config.json")
            if not isinstance(settings, dict):
                raise ValueError(f"{folder / 'tokenizer_config.json'} is not a JSON object")
        template = settings.get("chat_template")
        if (folder / "chat_template.jinja").is_file():  # where transformers 5 writes it
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        text = file.read_text(encoding="utf-8")
        self._load(text, _token_text(settings.get("eos_token")), template, source=str(file))

    def _load(
        self,
        tokenizer_json: str,
        eos_token: str | None,
        chat_template: Any,
        source: str = "the checkpoint's tokenizer_json",
    ) -> None:
        self.tokenizer_json = tokenizer_json
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the library's own errors name no file
            raise ValueError(f"{source} is not a tokenizer that `tokenizers` reads ({e})") from e
        added = self._tok.get_added_tokens_decoder()
        self._specials = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        if eos_token is None:
            eos_token = next((t for t in _EOS_NAMES if t in self._specials), None)
        if eos_token is not None and self._tok.token_to_id(eos_token) is None:
            raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
        self.eos_token = eos_token
        self.chat_template = chat_template  # kept for chat formatting (str, or named templates)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """The library parallelises in Rust (RAYON_NUM_THREADS), so num_threads is unused."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.decode([i]) for i in ids]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def eot_id(self) -> int | None:
        """The model's end-of-text: tokenizer_config.json's eos_token (e.g. Qwen3's <|im_end|>),
        else <|endoftext|>, <|end_of_text|> or </s>."""
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    def identity(self) -> str:
        return "hf-" + short_hash(self.tokenizer_json)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "tokenizer_json": self.tokenizer_json,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_dict(cls, d: dict) -> HFTokenizer:
        tok = cls.__new__(cls)
        tok._load(d["tokenizer_json"], d.get("eos_token"), d.get("chat_template"))
        return tok
