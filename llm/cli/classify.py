"""``llm classify ckpt_path=... text="You won a prize!"``: prints ``<label>\t<probability>``."""

from __future__ import annotations

from omegaconf import DictConfig

from llm.cli.app import hydra_app, read_free_text, resolve_device


def read_text(cfg: DictConfig) -> str:
    """The text to classify; an empty one is refused (a classifier would still print a label
    and a confident-looking probability for it), naming where it came from."""
    text = read_free_text(cfg, "text")
    if text.strip():
        return text
    source = cfg.get("text_file")
    if source is None:
        where = "text="
    elif str(source) == "-":
        where = "text_file=- (standard input)"
    else:
        where = f"text_file={source}"
    raise ValueError(
        f"{where} is empty (or only whitespace): there is no text to classify; give one, e.g. "
        "'text=Claim your free prize now!' or text_file=message.txt"
    )


@hydra_app("classify")
def main(cfg: DictConfig) -> None:
    """Print the label and its probability, tab separated."""
    from llm.checkpoint import load_checkpoint

    text = read_text(cfg)
    module = load_checkpoint(cfg.ckpt_path, resolve_device(str(cfg.device)), kind="classifier")
    label, prob = module.predict_texts([text])[0]
    print(f"{label}\t{prob:.4f}", flush=True)
