"""Pretraining as a task of the one fit (`llm.training.run.fit`): a GPT from scratch on the
sliding windows of a corpus, with the model, tokenizer and data the config composes."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from llm import checks
from llm.training.run import Built, Task, data_params


def sample_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """``callbacks.sample_text`` as plain settings, kept in checkpoints for later generation."""
    sample = (cfg.get("callbacks") or {}).get("sample_text")
    if not sample:
        return None
    settings = OmegaConf.to_container(sample, resolve=True)
    assert isinstance(settings, dict)
    return {k: v for k, v in settings.items() if k != "_target_"}


class Pretrain(Task):
    """Next-token prediction from random weights (`GPTLitModule`)."""

    name = "pretrain"

    def __init__(self) -> None:
        self._model: Any = None

    def validate(self, cfg: DictConfig) -> None:
        import hydra

        super().validate(cfg)
        # model.* checked before any data is tokenized (the vocabulary comes from the data)
        self._model = hydra.utils.instantiate(cfg.model, vocab_size=1)
        checks.context_fits(cfg.get("data", {}).get("block_size"), self._model.block_size)

    def build(self, cfg: DictConfig) -> Built:
        import dataclasses

        import hydra

        from llm.training.module import GPTLitModule

        tokenizer = hydra.utils.instantiate(cfg.tokenizer)
        dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer)
        dm.prepare_data()
        model = dataclasses.replace(self._model, vocab_size=int(dm.vocab_size)).to_dict()
        self.check_memory(cfg, model, dm)
        module = GPTLitModule(
            model=model,
            tokenizer=dm.tokenizer.to_dict(),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),  # type: ignore[arg-type]
            compile=bool(cfg.get("compile", False)),
            sample=sample_settings(cfg),
        )
        params = {"model": model, "data": data_params(cfg), "tokenizer": dm.tokenizer.identity()}
        return Built(module, dm, params)
