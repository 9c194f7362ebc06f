"""``llm classify ckpt_path=... text="You won a prize!"``: prints ``<label>\t<probability>``."""

from __future__ import annotations

from omegaconf import DictConfig

from llm.cli.app import hydra_app, read_free_text, resolve_device


@hydra_app("classify")
def main(cfg: DictConfig) -> None:
    """Print the label and its probability, tab separated."""
    from llm.checkpoint import load_checkpoint

    text = read_free_text(cfg, "text")
    module = load_checkpoint(cfg.ckpt_path, resolve_device(str(cfg.device)), kind="classifier")
    label, prob = module.predict_texts([text])[0]
    print(f"{label}\t{prob:.4f}", flush=True)
