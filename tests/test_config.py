"""Every option of every config group of `conf/train.yaml` composes and instantiates.

Through Hydra's compose API, as `llm train group=option` would. GPU trainers are
instantiated with `accelerator=cpu` so the test runs here; their GPU settings are asserted.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from helpers import compose
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("model", "tokenizer", "data", "trainer", "optim", "logger", "callbacks", "experiment")
BASE = ["output_dir=/tmp/llm-test-config", "data.path=/tmp/corpus.txt"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def _compose(*overrides: str) -> DictConfig:
    return compose("train", [*BASE, *overrides])


def test_every_group_has_options_and_the_defaults_exist() -> None:
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ is empty"
    cfg = _compose()  # the groups' own defaults (`llm train` adds the recipe: test_recipe.py)
    assert cfg.model.n_layer == 4 and cfg.data.stride is None
    assert cfg.trainer.max_steps == 2000 and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("name", _options("model"))
def test_model_options_instantiate(name: str) -> None:
    from llm.model import GPTConfig

    cfg = _compose(f"model={name}", "~experiment")
    config = hydra.utils.instantiate(cfg.model, vocab_size=65)
    assert isinstance(config, GPTConfig) and config.vocab_size == 65
    assert config.block_size == cfg.data.block_size  # data follows the model's context
    if name == "tiny":  # building gpt2-xl's 1.5B parameters is no test; tiny one is built
        from llm.model import GPT

        assert GPT(config)(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 4, 65)


@pytest.mark.parametrize("name", _options("tokenizer"))
def test_tokenizer_options_instantiate(name: str, tmp_path: Path) -> None:
    from _hf_utils import train_tokenizer

    from llm.tokenizers import Tokenizer

    # tokenizer=hf reads a model folder's tokenizer.json: one trained here
    path = [f"tokenizer.path={train_tokenizer(tmp_path)}"] if name == "hf" else []
    tok = hydra.utils.instantiate(_compose(f"tokenizer={name}", *path).tokenizer)
    assert isinstance(tok, Tokenizer)
    if tok.needs_fit:  # char and trained BPE learn their vocabulary from the corpus
        tok.fit(["hello world, hello there"] * 4)
    assert tok.decode(tok.encode("hello")) == "hello"


@pytest.mark.parametrize("name", _options("data"))
def test_data_options_instantiate(name: str, tmp_path: Path) -> None:
    from llm.data import TextDataModule
    from llm.tokenizers import CharTokenizer

    cfg = _compose(f"data={name}", f"paths.data_dir={tmp_path}")
    dm = hydra.utils.instantiate(cfg.data, tokenizer=CharTokenizer())
    assert isinstance(dm, TextDataModule)
    assert dm.block_size == cfg.model.block_size == 64  # the data's window is the model's context


@pytest.mark.parametrize("name", _options("trainer"))
def test_trainer_options_instantiate(name: str, tmp_path: Path) -> None:
    import lightning as L

    cfg = _compose(f"trainer={name}", f"output_dir={tmp_path}")
    gpu = cfg.trainer.accelerator == "gpu"
    from llm.training.trainer import compute_precision

    sharded = name.startswith("fsdp")
    if gpu:  # bf16: autocast, or FSDP2's mixed precision (no autocast on top)
        assert compute_precision(cfg.trainer) == "bf16-mixed"
        assert (cfg.trainer.precision == "32-true") == sharded
    over: dict = {"accelerator": "cpu", "precision": "32-true"} if gpu else {}
    if cfg.trainer.get("devices") == -1:
        over["devices"] = 1
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, **over)
    assert isinstance(trainer, L.Trainer) and trainer.max_steps == cfg.trainer.max_steps
    if sharded:  # FSDP2 (it runs on CPUs over gloo too), not Lightning's FSDP1 strategy
        assert type(trainer.strategy).__name__ == "FSDP2Strategy"
    if name == "ddp_cpu":
        assert trainer.num_devices == 2
        # spawned workers, not a re-launch of the script (which would re-run Hydra)
        assert type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher"


@pytest.mark.parametrize("name", _options("optim"))
def test_optim_options_build_an_optimizer(name: str) -> None:
    from llm.model import GPT, GPTConfig
    from llm.training.optim import build_optimizer

    o = _compose(f"optim={name}").optim
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    opt = build_optimizer(model, o)
    assert opt.param_groups[0]["weight_decay"] == o.weight_decay
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_logger_and_callback_options_instantiate(group: str, tmp_path: Path) -> None:
    from llm.training.trainer import instantiate_all

    for name in _options(group):
        cfg = _compose(f"{group}={name}", f"output_dir={tmp_path}")
        objs = instantiate_all(cfg[group])
        targets = [c._target_ for c in cfg[group].values() if c and "_target_" in c]
        assert targets, f"conf/{group}/{name}.yaml instantiates nothing"
        # a class target builds that class; a factory (progress_bar) builds one of its kinds
        names = [t.rsplit(".", 1)[-1] for t in targets]
        built = [type(o).__name__ for o in objs]
        assert len(built) == len(names)
        assert all(b == n or not n[:1].isupper() for b, n in zip(built, names, strict=True))


@pytest.mark.parametrize(
    "name", [n for n in _options("experiment") if not n.startswith("finetune_")]
)
def test_experiment_options_compose(name: str) -> None:
    cfg = _compose(f"experiment={name}")
    OmegaConf.resolve(cfg)
    assert cfg.data.block_size == cfg.model.block_size
    assert cfg.optim.lr > cfg.optim.min_lr > 0 and cfg.trainer.max_steps > 0


@pytest.mark.parametrize("name", [n for n in _options("experiment") if n.startswith("finetune_")])
def test_finetune_experiments_compose(name: str) -> None:
    """The recipes of `llm finetune` (named finetune_*, which is how `--help` sorts them)."""
    cfg = compose("finetune", [f"experiment={name}", "data.path=/tmp/d.tsv", *BASE[:1]])
    OmegaConf.resolve(cfg)
    assert cfg.task.name in ("text", "classify") and cfg.init == "gpt2"
    assert cfg.optim.lr == cfg.optim.min_lr > 0 and cfg.trainer.max_steps > 0


@pytest.mark.parametrize("name", _options("hparams_search"))
def test_hparams_search_options_compose(name: str) -> None:
    """Each search composes onto our Optuna sweeper, and every key it searches is a key of the
    train config (a misspelt one would add a key no code reads)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(
            "train", overrides=[*BASE, f"hparams_search={name}"], return_hydra_config=True
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == (
        "hydra_plugins.llm_optuna_sweeper.llm_optuna_sweeper.LLMOptunaSweeper"
    )
    assert sweeper.direction in ("minimize", "maximize") and sweeper.n_trials > 0
    assert sweeper.storage.startswith("sqlite:///") and sweeper.storage.endswith("optuna.db")
    assert len(sweeper.params) > 0
    missing = [
        k for k in sweeper.params if OmegaConf.select(cfg, k, default="<missing>") == "<missing>"
    ]
    assert missing == [], f"{name} searches keys the train config does not have"


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_option_lists_the_choices(group: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _compose(f"{group}=no_such_option")
    msg = str(err.value)
    assert "no_such_option" in msg
    for option in _options(group):
        assert option in msg, f"{option} missing from: {msg}"
