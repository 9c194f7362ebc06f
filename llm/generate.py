"""Sample text from a trained checkpoint.

`python -m llm.generate ckpt_path=... prompt="ROMEO:" max_new_tokens=500 temperature=0.8`
prints prompt + continuation. `generate_text` holds the logic so tests need no subprocess.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from llm.training.module import GPTLitModule


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present so the same command works on laptops and GPU boxes."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}, but this machine has no CUDA GPU; use cpu or auto")
    return resolved


@torch.no_grad()
def generate_text(
    module: GPTLitModule,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int | None = None,
) -> str:
    """Prompt + sampled continuation, decoded with the checkpoint's own tokenizer.

    A fixed seed gives the same text every call (on the same device). An empty prompt starts
    from the end-of-text token, as a document boundary is what the model saw before new text.
    """
    tok = module.tokenizer
    if tok is None:
        raise ValueError("this checkpoint has no tokenizer; it cannot encode a prompt")
    ids = tok.encode(prompt)
    if not ids:
        if tok.eot_id is None:
            raise ValueError(
                "empty prompt and the tokenizer has no end-of-text token to start from"
            )
        ids = [tok.eot_id]
    module.eval()
    device = next(module.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = module.model.generate(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    new = out[0, idx.size(1) :].tolist()
    return prompt + tok.decode(new)


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: load, sample `num_samples` times (seed, seed+1, ...), print."""
    from llm.checkpoint import load_checkpoint

    if int(cfg.max_new_tokens) < 0 or int(cfg.num_samples) < 1:
        raise ValueError(
            "max_new_tokens must be >= 0 and num_samples >= 1, got "
            f"{cfg.max_new_tokens} and {cfg.num_samples}"
        )
    module = load_checkpoint(cfg.ckpt_path, map_location=resolve_device(str(cfg.device)))
    for i in range(int(cfg.num_samples)):
        if i:
            print("\n" + "-" * 40)
        seed = None if cfg.seed is None else int(cfg.seed) + i
        text = generate_text(
            module,
            str(cfg.prompt),
            int(cfg.max_new_tokens),
            temperature=float(cfg.temperature),
            top_k=None if cfg.top_k is None else int(cfg.top_k),
            top_p=None if cfg.top_p is None else float(cfg.top_p),
            seed=seed,
        )
        print(text, flush=True)


if __name__ == "__main__":
    main()
