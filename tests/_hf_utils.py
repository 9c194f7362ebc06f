"""A tiny Hugging Face tokenizer.json trained here with `tokenizers`, for offline tests."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "<|im_start|>user\nhello there, how are you?<|im_end|>\n",
    "numbers 0123456789 and accents: héllo wörld, 日本語 🙂\n",
] * 30


def train_tokenizer(folder: Path, eos_token: str | None = "<|im_end|>") -> Path:
    """Byte-level BPE (Qwen / Llama 3 style) with chat specials, saved as a model folder's
    tokenizer.json + tokenizer_config.json; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": CHAT_TEMPLATE, **({"eos_token": eos_token} if eos_token else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
