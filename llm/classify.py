"""Classify a text with a finetuned classifier checkpoint.

`python -m llm.classify ckpt_path=.../checkpoints/last.ckpt text="You won a prize!"` prints
`<label>\t<probability>`. `classify_text` holds the logic so tests need no subprocess.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llm.finetuning.checkpoint import load_finetuned
from llm.generate import resolve_device


def classify_text(ckpt_path: str, text: str, device: str = "auto") -> tuple[str, float]:
    """(predicted label, its softmax probability)."""
    module = load_finetuned(ckpt_path, map_location=resolve_device(device))
    if not hasattr(module, "predict_texts"):
        raise ValueError(
            f"{ckpt_path} is a language-model checkpoint, not a classifier; "
            "use python -m llm.generate for it"
        )
    return module.predict_texts([text])[0]


@hydra.main(version_base="1.3", config_path="../conf", config_name="classify")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: print label and probability, tab separated."""
    label, prob = classify_text(str(cfg.ckpt_path), str(cfg.text), str(cfg.device))
    print(f"{label}\t{prob:.4f}", flush=True)


if __name__ == "__main__":
    main()
