"""``llm generate ckpt_path=... prompt="ROMEO:" max_new_tokens=500 temperature=0.8``.

Prints the prompt, then its continuation token by token as it is sampled, and the count and
tokens/s on standard error. Ctrl-C stops sampling: what came so far stays printed (exit status
130). Free text needs no Hydra quoting (the ``llm`` command quotes ``prompt=``);
``prompt_file=<path>`` or ``prompt_file=-`` (standard input) reads it.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from llm.cli.app import hydra_app, read_free_text, resolve_device, sampling_settings


@hydra_app("generate")
def main(cfg: DictConfig) -> None:
    """Load, sample ``num_samples`` times (seed, seed+1, ...), stream each to stdout."""
    from llm.checkpoint import load_language_model
    from llm.inference import stream_text

    settings = sampling_settings(cfg)
    prompt = read_free_text(cfg, "prompt")
    lm = load_language_model(cfg.ckpt_path, resolve_device(str(cfg.device)))
    for i in range(int(cfg.num_samples)):
        if i:
            print("\n" + "-" * 40)
        seed = None if settings["seed"] is None else settings["seed"] + i
        stream = stream_text(
            lm.model,
            lm.tokenizer,
            prompt,
            settings["max_new_tokens"],
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
            seed=seed,
        )
        print(prompt, end="", flush=True)
        try:
            for piece in stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(flush=True)
            print(f"[{stream.rate()}]", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(f"Interrupted: stopped after {stream.count} tokens.") from None
        print(flush=True)
        print(f"[{stream.rate()}]", file=sys.stderr, flush=True)
