"""``llm generate ckpt_path=... prompt="ROMEO:" max_new_tokens=500 temperature=0.8``.

Prints the prompt and its continuation. Free text needs no Hydra quoting (the ``llm`` command
quotes ``prompt=``); ``prompt_file=<path>`` or ``prompt_file=-`` (standard input) reads it.
"""

from __future__ import annotations

from omegaconf import DictConfig

from llm.cli.app import hydra_app, read_free_text, resolve_device


@hydra_app("generate")
def main(cfg: DictConfig) -> None:
    """Load, sample ``num_samples`` times (seed, seed+1, ...), print."""
    from llm.checkpoint import load_language_model
    from llm.inference import generate_text

    if int(cfg.max_new_tokens) < 0 or int(cfg.num_samples) < 1:
        raise ValueError(
            "max_new_tokens must be >= 0 and num_samples >= 1, got "
            f"{cfg.max_new_tokens} and {cfg.num_samples}"
        )
    prompt = read_free_text(cfg, "prompt")
    lm = load_language_model(cfg.ckpt_path, resolve_device(str(cfg.device)))
    for i in range(int(cfg.num_samples)):
        if i:
            print("\n" + "-" * 40)
        seed = None if cfg.seed is None else int(cfg.seed) + i
        text = generate_text(
            lm.model,
            lm.tokenizer,
            prompt,
            int(cfg.max_new_tokens),
            temperature=float(cfg.temperature),
            top_k=None if cfg.top_k is None else int(cfg.top_k),
            top_p=None if cfg.top_p is None else float(cfg.top_p),
            seed=seed,
        )
        print(text, flush=True)
