"""`llm train` alone runs the CPU recipe; a user's own groups compose on clean defaults, so no
key comes from an experiment the command line did not name."""

from __future__ import annotations

import pytest
import yaml
from helpers import ROOT, compose, run_cli
from omegaconf import OmegaConf

from llm.cli import VERBS
from llm.cli.app import with_recipe

TRAIN = VERBS["train"].recipe
RECIPE = OmegaConf.load(ROOT / "conf/experiment/shakespeare_char_cpu.yaml")


@pytest.mark.parametrize(
    "args",
    [
        ["data=openwebtext", "model=baby", "tokenizer=gpt2", "trainer=gpu"],
        ["model=tiny"],
        ["optim=muon", "optim.lr=0.01"],
        ["trainer=ddp_cpu", "data.batch_size=4"],
        ["-m", "model=tiny,cpu", "optim.lr=3e-4,1e-3"],
    ],
)
def test_a_users_groups_compose_on_clean_defaults(args: list[str]) -> None:
    composed = with_recipe(TRAIN, args)
    assert composed == args  # nothing added: no experiment they did not name
    words = [a for a in args if not a.startswith("-")]
    cfg = compose("train", [w.split(",")[0] for w in words])  # one job of a sweep
    assert cfg.data.stride is None  # the recipe's stride=1 does not leak in
    if not any(w.startswith("optim.lr") for w in words):
        adamw = OmegaConf.load(ROOT / "conf/optim/adamw.yaml")
        defaults = OmegaConf.load(ROOT / f"conf/optim/{cfg.optim.name}.yaml")
        assert cfg.optim.lr == defaults.lr and list(cfg.optim.betas) == list(adamw.betas)
    assert list(cfg.optim.betas) != list(RECIPE.optim.betas)


@pytest.mark.parametrize(
    "args", [[], ["optim.lr=2e-3"], ["-m", "optim.lr=1e-3,2e-3"], ["-m", "-c", "job", "seed=2"]]
)
def test_train_alone_or_with_keys_only_runs_the_recipe(args: list[str]) -> None:
    from hydra._internal.utils import get_args_parser

    composed = with_recipe(TRAIN, args)
    flags = [a for a in args if "=" not in a]
    assert composed == [*flags, "experiment=shakespeare_char_cpu", *args[len(flags) :]]
    parsed = get_args_parser().parse_args(composed)  # Hydra's parser takes it as written
    assert parsed.overrides == composed[len(flags) :]
    cfg = compose("train", [a.split(",")[0] for a in composed if "=" in a])
    assert cfg.data.stride == RECIPE.data.stride == 1
    assert cfg.optim.min_lr == RECIPE.optim.min_lr
    assert list(cfg.optim.betas) == list(RECIPE.optim.betas)
    assert cfg.optim.lr == (2e-3 if "optim.lr=2e-3" in args else RECIPE.optim.lr)


def test_the_optuna_search_runs_around_the_recipe_unless_told_otherwise() -> None:
    search = ["hparams_search=shakespeare_char_cpu_optuna"]
    assert with_recipe(TRAIN, search) == search  # the search config names its experiment
    assert compose("train", search).data.stride == 1
    other = compose("train", [*search, "experiment=shakespeare_char"])
    assert other.data.stride is None and other.model.n_layer == 6  # experiment= wins


def test_the_command_composes_what_the_tests_compose() -> None:
    """Through the `llm` command (`--cfg job` prints the composed config)."""
    user = run_cli("train", "data=openwebtext", "model=baby", "tokenizer=gpt2", "--cfg", "job")
    assert user.returncode == 0, user.stderr[-2000:]
    printed = yaml.safe_load(user.stdout)
    assert printed["data"]["stride"] is None and printed["optim"]["lr"] == 6e-4
    alone = yaml.safe_load(run_cli("train", "--cfg", "job").stdout)
    assert alone["data"]["stride"] == 1 and alone["optim"]["betas"] == [0.9, 0.99]


@pytest.mark.parametrize("config", ["train", "finetune"])
def test_a_misspelt_experiment_is_refused_with_the_choices(config: str) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="shakespeare_char_cpu_speedrun"):
        compose(config, ["experiment=shakespeare_char_cpu_sppedrun"])
