"""``llm export ckpt_path=... [out=merged.ckpt] [hf_dir=folder/]``.

``out`` folds a LoRA checkpoint's adapters into plain weights (the same kind of checkpoint,
without LoRA); ``hf_dir`` writes a language model as a Hugging Face folder
(config.json + model.safetensors) that ``transformers`` loads.
"""

from __future__ import annotations

from omegaconf import DictConfig

from llm.cli.app import hydra_app


@hydra_app("export")
def main(cfg: DictConfig) -> None:
    """Export as asked and print where each file went."""
    from llm.checkpoint import describe, export_merged, load_checkpoint, read_checkpoint

    if cfg.out is None and cfg.hf_dir is None:
        raise ValueError("say what to export: out=<merged.ckpt> and/or hf_dir=<folder>")
    source = str(cfg.ckpt_path)
    if cfg.out is not None:
        print(f"merged checkpoint: {export_merged(source, str(cfg.out))}")
        source = str(cfg.out)
    if cfg.hf_dir is not None:
        kind = read_checkpoint(source)["kind"]
        if kind != "lm":
            raise ValueError(
                f"hf_dir= exports language models; ckpt_path={cfg.ckpt_path} is a "
                f"{describe(kind)} checkpoint"
            )
        module = load_checkpoint(source, kind="lm")
        if module.hparams.get("lora"):
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path} holds LoRA adapters: add out=<merged.ckpt> to merge "
                "them before hf_dir="
            )
        print(f"Hugging Face folder: {module.model.save_pretrained(str(cfg.hf_dir))}")
