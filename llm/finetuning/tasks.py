"""The finetuning tasks of the one fit (`llm.training.run.fit`): each starts from ``init=``
weights (a llm checkpoint or a Hugging Face folder) and says what it trains on them. The config
group ``task=`` instantiates one (``task._target_``); its other keys are the task's settings.

A new task is a `Finetune` subclass (its module in `build_module`, its outputs in `after_fit`)
and one ``conf/task/<name>.yaml``: docs/finetuning.md shows the smallest one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from llm.training.run import Built, Task, data_params


def lora_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``lora`` group as checked plain settings (None: full finetuning)."""
    from llm.model.lora import lora_config

    return lora_config(OmegaConf.to_container(cfg.lora) if cfg.get("lora") else None)


def init_tokenizer(cfg: DictConfig, init: Any) -> Any:
    """The init's own tokenizer (a checkpoint's, a Hugging Face folder's), else cfg.tokenizer."""
    import hydra

    from llm.tokenizers import tokenizer_from_dict

    if init.tokenizer:
        tok = tokenizer_from_dict(init.tokenizer)
    else:
        tok = hydra.utils.instantiate(cfg.tokenizer)
        if tok.needs_fit:
            raise ValueError(
                f"tokenizer {type(tok).__name__} must be fitted, but {init.source} carries no "
                "tokenizer; use a pretrained one (tokenizer=gpt2)"
            )
    if tok.vocab_size > init.model["vocab_size"]:
        raise ValueError(
            f"the tokenizer's vocab_size {tok.vocab_size} > the model's "
            f"{init.model['vocab_size']}: tokenizer={cfg.tokenizer.get('_target_')} does not "
            f"match init={init.source}"
        )
    return tok


class Finetune(Task):
    """From ``init=`` weights: load them, build the data with their tokenizer and context,
    build the task's module on them (`build_module`), and load the weights in."""

    name = "finetune"
    advice = (
        "finetune a smaller init= model (lora=default keeps no gradients or optimizer state for "
        "the frozen weights)",
        "lower data.batch_size (or block_size=, data.max_length: the tokens in each sequence)",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: dict[str, int] = {}

    def validate(self, cfg: DictConfig) -> None:
        if not cfg.get("init"):
            raise ValueError(
                "init= is required: a llm checkpoint (.ckpt), a Hugging Face model folder, or a "
                "hub name such as init=gpt2"
            )
        super().validate(cfg)
        lora_settings(cfg)  # lora.* named now, not as a NaN loss after the weights are loaded
        if "path" in cfg.data.keys():  # noqa: SIM118 - `in cfg.data` is False for a `???`
            _ = cfg.data.path  # a `???` left unset raises here, naming data.path, before a load

    def build(self, cfg: DictConfig) -> Built:
        import hydra

        from llm.initial_weights import load_base_weights, load_init
        from llm.model.lora import count_params

        block_size = cfg.get("block_size")
        init = load_init(
            str(cfg.init),
            block_size=None if block_size is None else int(block_size),
            dropout=cfg.get("dropout"),
        )
        tokenizer = init_tokenizer(cfg, init)
        lora = lora_settings(cfg)
        data = cfg.data.copy()
        with open_dict(data):
            data.block_size = int(init.model["block_size"])
            if "template" in data:
                data.template = self.template_of(init)
        dm = hydra.utils.instantiate(data, tokenizer=tokenizer)
        dm.prepare_data()
        self.check_memory(cfg, init.model, dm, *self.memory_shape(init.model, lora, dm))
        common = {
            "model": init.model,
            "tokenizer": dm.tokenizer.to_dict(),
            "optim": OmegaConf.to_container(cfg.optim, resolve=True),
            "compile": bool(cfg.get("compile", False)),
            "lora": lora,
        }
        module = self.build_module(cfg, common, dm)
        load_base_weights(module.model, init.state_dict)
        self.loaded(module)
        self.counts = {
            "params/trainable": count_params(module, trainable=True),
            "params/total": count_params(module),
        }
        params = {
            "task": OmegaConf.to_container(cfg.task, resolve=True),
            "model": init.model,
            "lora": lora or "none",
            "data": {
                **data_params(cfg),
                **({"template": dm.template} if "template" in data else {}),
            },
        }
        return Built(module, dm, params)

    def build_module(self, cfg: DictConfig, common: dict[str, Any], dm: Any) -> Any:
        """The task's LightningModule on the init's model (``common``: its `TaskModule` args)."""
        raise NotImplementedError

    def template_of(self, init: Any) -> str | None:
        """The prompt template a data module with a ``template`` key renders with."""
        return init.template

    def loaded(self, module: Any) -> None:
        """After the init weights are in the module (before any checkpoint is resumed)."""

    def memory_shape(
        self, model: dict[str, Any], lora: dict[str, Any] | None, dm: Any
    ) -> tuple[float, int | None]:
        """(share of the weights that train, logits' width) for the memory check."""
        return (0.0 if lora else 1.0), None

    def after_fit(self, cfg: DictConfig, built: Built, trainer: Any, result: dict) -> None:
        from llm.training.board import END

        result.update(self.counts)
        # an end figure in HPARAMS (whole_run/params is the total), not a one-point plot
        trainable = float(self.counts["params/trainable"])
        result.setdefault("end_metrics", {})[f"{END}params_trainable"] = trainable
        # rank 0's: a rank whose own val metrics differ names another file than the one written
        best = trainer.strategy.broadcast(result["best_model_path"])
        if best:  # test accuracy and responses come from the best weights (every rank)
            from llm.checkpoint import is_distributed_checkpoint, read_checkpoint

            if is_distributed_checkpoint(best):  # a sharded run's: each rank reads its shards
                trainer.strategy.load_checkpoint(best, weights_only=True)
            else:
                built.module.load_state_dict(read_checkpoint(best)["state_dict"])

    def outcome_lines(self, result: dict[str, Any]) -> list[str]:
        total, trainable = result["params/total"], result["params/trainable"]
        share = trainable / total
        return [f"Trained:         {trainable:,} of {total:,} parameters ({share:.2%})"]


class TextFinetune(Finetune):
    """Continue pretraining on another corpus (nanoGPT's finetune_shakespeare)."""

    def build_module(self, cfg: DictConfig, common: dict[str, Any], dm: Any) -> Any:
        from llm.training.module import GPTLitModule
        from llm.training.pretrain import sample_settings

        return GPTLitModule(**common, sample=sample_settings(cfg))


class TemplatedFinetune(Finetune):
    """A task whose prompts are rendered with a template: ``task.template`` names one
    (alpaca, chat, or null / none: plain text, as `llm chat` spells it), ``auto`` takes the
    init's own."""

    def __init__(self, name: str, template: str | None = "auto") -> None:
        super().__init__(name)
        self.template = template

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        if self.template != "auto":  # a typo is named before the weights load
            from llm.prompts import check_template

            check_template(self.template, "task.template")

    def template_of(self, init: Any) -> str | None:
        from llm.prompts import check_template

        if self.template == "auto":
            return init.template
        return check_template(self.template, "task.template")


class InstructFinetune(TemplatedFinetune):
    """Follow instructions (Alpaca records; the loss on the responses only), then write the
    val set's greedy responses (responses.json) for a look at what it learnt."""

    def __init__(
        self, name: str, max_new_tokens: int = 256, template: str | None = "alpaca"
    ) -> None:
        super().__init__(name, template)
        self.max_new_tokens = int(max_new_tokens)

    def build_module(self, cfg: DictConfig, common: dict[str, Any], dm: Any) -> Any:
        from llm.training.module import GPTLitModule

        return GPTLitModule(**common, template=dm.template)  # how llm chat renders prompts

    def after_fit(self, cfg: DictConfig, built: Built, trainer: Any, result: dict) -> None:
        super().after_fit(cfg, built, trainer, result)
        if not trainer.is_global_zero:
            return
        from llm.finetuning.instruct import save_responses

        saved = result["best_model_path"] or result["last_model_path"]
        folder = Path(saved).parent if saved else Path(cfg.output_dir)
        result["responses_path"] = save_responses(
            built.module,
            built.datamodule.records["val"],
            folder / "responses.json",
            max_new_tokens=self.max_new_tokens,
            template=built.datamodule.template,
        )

    def outcome_lines(self, result: dict[str, Any]) -> list[str]:
        lines = super().outcome_lines(result)
        if result.get("responses_path"):
            lines.append(f"Responses:       {result['responses_path']}")
        return lines


class PolicyFinetune(TemplatedFinetune):
    """A post-training task: a language model tuned against its frozen initial self, prompts
    rendered with the init's template (``task.template=auto``) or the one named."""

    metric = "val/loss"  # the val metric the summary shows before and after

    def loaded(self, module: Any) -> None:
        module.freeze_reference()

    def outcome_lines(self, result: dict[str, Any]) -> list[str]:
        lines = super().outcome_lines(result)
        history = result["module"].val_history
        seen = [(s, m[self.metric]) for s, m in history if self.metric in m]
        if seen:
            (s0, a0), (s1, a1) = seen[0], seen[-1]
            name = f"{self.metric}:"
            lines.append(f"{name:<16} {a0:.4f} at step {s0} -> {a1:.4f} at step {s1}")
        return lines


class PreferenceFinetune(PolicyFinetune):
    """DPO (``task.loss=sigmoid``) or IPO on preference pairs; the summary reports the val
    reward accuracy before and after."""

    metric = "val/reward_acc"

    def __init__(
        self,
        name: str,
        beta: float = 0.1,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_ref: bool = False,
        template: str | None = "auto",
    ) -> None:
        from llm.finetuning.preference import check_preference

        super().__init__(name, template)
        self.settings = check_preference(
            {
                "beta": beta,
                "loss": loss,
                "label_smoothing": label_smoothing,
                "precompute_ref": precompute_ref,
            }
        )

    def build_module(self, cfg: DictConfig, common: dict[str, Any], dm: Any) -> Any:
        from llm.finetuning.preference import PreferenceModule

        return PreferenceModule(**common, template=dm.template, preference=self.settings)


class RLFinetune(PolicyFinetune):
    """GRPO with the reward function of ``reward=``; the summary reports the held-out
    accuracy (greedy) before and after."""

    metric = "val/accuracy"

    def __init__(self, name: str, template: str | None = "auto", **settings: Any) -> None:
        super().__init__(name, template)
        self.settings = settings

    def rl_settings(self, cfg: DictConfig) -> dict[str, Any]:
        from llm.finetuning.grpo import build_reward, check_rl

        reward = OmegaConf.to_container(cfg.reward, resolve=True) if cfg.get("reward") else None
        settings = check_rl({**self.settings, "reward": reward})
        build_reward(settings["reward"])  # a reward that names no function fails now
        return settings

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        self.rl_settings(cfg)

    def build_module(self, cfg: DictConfig, common: dict[str, Any], dm: Any) -> Any:
        from llm.finetuning.grpo import GRPOModule

        return GRPOModule(**common, template=dm.template, rl=self.rl_settings(cfg))

    def loaded(self, module: Any) -> None:
        if module.rl["kl_coef"] > 0:  # no reference kept when nothing reads it
            module.freeze_reference()


class ClassifyFinetune(Finetune):
    """A class per text: a linear head on the last real token (LLMs-from-scratch ch. 6); the
    test split, when there is one, is scored with the best weights."""

    def __init__(self, name: str, trainable_layers: int | None = None) -> None:
        super().__init__(name)
        self.trainable_layers = trainable_layers

    def build_module(self, cfg: DictConfig, common: dict[str, Any], dm: Any) -> Any:
        from llm.finetuning.classify import ClassifierModule

        return ClassifierModule(
            **common,
            labels=dm.labels,
            max_length=dm.max_length,
            trainable_layers=self.trainable_layers,
        )

    def memory_shape(
        self, model: dict[str, Any], lora: dict[str, Any] | None, dm: Any
    ) -> tuple[float, int | None]:
        layers = self.trainable_layers
        share = 0.0 if lora else 1.0 if layers is None else int(layers) / int(model["n_layer"])
        return share, len(dm.labels) if getattr(dm, "labels", None) else None

    def after_fit(self, cfg: DictConfig, built: Built, trainer: Any, result: dict) -> None:
        from llm.training.board import END

        super().after_fit(cfg, built, trainer, result)
        if built.datamodule.splits.get("test"):
            test = trainer.test(built.module, datamodule=built.datamodule, verbose=False)[0]
            result["test"] = test
            ends = {f"{END}{k.replace('/', '_')}": v for k, v in test.items()}
            result.setdefault("end_metrics", {}).update(ends)

    def outcome_lines(self, result: dict[str, Any]) -> list[str]:
        lines = super().outcome_lines(result)
        if "val/acc" in result["metrics"]:
            lines.append(f"val/acc:         {result['metrics']['val/acc']:.4f}")
        return lines + [f"{k + ':':<16} {v:.4f}" for k, v in (result.get("test") or {}).items()]
