"""``llm <verb> --help``: a description, examples, then only the config groups the verb uses.

Hydra's own help lists every group under conf/, finetuning's beside pretraining's; composing
the verb's config instead shows what this verb reads, with each group's default.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from llm.cli.app import CONFIG_DIR, with_recipe

if TYPE_CHECKING:
    from llm.cli import Verb

CONF = Path(CONFIG_DIR)
HYDRA_FLAGS = (
    "Hydra: -m/--multirun (sweeps), --cfg job (print the composed config), --info,\n"
    "--hydra-help. A failing run prints a short error; HYDRA_FULL_ERROR=1 shows the traceback."
)
# experiments run by `llm finetune` are named finetune_*; the others are `llm train`'s
_FINETUNE_PREFIX = "finetune_"


def group_options(group: str, verb: str) -> list[str]:
    """Selectable options of ``conf/<group>/`` (``_base`` files are inherited, not chosen)."""
    options = sorted(
        p.relative_to(CONF / group).with_suffix("").as_posix()
        for p in (CONF / group).rglob("*.yaml")
        if not p.name.startswith("_")
    )
    if group == "experiment":
        finetune = verb in ("finetune", "rl")
        options = [o for o in options if o.startswith(_FINETUNE_PREFIX) == finetune]
    return options


def _compose(config: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides, return_hydra_config=True)


def _scalars(cfg: DictConfig, groups: set[str]) -> list[str]:
    """Top-level ``key=default`` pairs that no group owns."""
    raw: Any = OmegaConf.to_container(cfg, resolve=False)
    out = []
    for key, value in raw.items():
        if key == "hydra" or key in groups or isinstance(value, dict | list):
            continue
        shown = (
            "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        )
        out.append(f"{key}={shown}")
    return out


def verb_help(name: str, verb: Verb) -> str:
    """The help text of one verb."""
    cfg = _compose(verb.config, with_recipe(verb.recipe, []))  # what `llm <verb>` alone runs
    choices = {g: c for g, c in cfg.hydra.runtime.choices.items() if g != "hydra" and "/" not in g}
    lines = [f"llm {name}: {verb.summary}", "", verb.description, "", "examples:"]
    lines += [f"  {e}" for e in verb.examples]
    if choices:
        lines += ["", "config groups (group=option; default in brackets):"]
        width = max(map(len, choices))
        for group in sorted(choices):
            options = group_options(group, name)
            default = choices[group]
            shown = ", ".join(f"[{o}]" if o == default else o for o in options)
            if default is None:
                shown += "  (optional, none by default)"
            lines.append(f"  {group:<{width}}  {shown}")
    keys = _scalars(cfg, set(choices))
    if keys:
        lines += ["", "keys (key=default):", *(f"  {k}" for k in keys)]
    lines += [
        "",
        "Any key of the composed config can be overridden (`llm "
        + name
        + " --cfg job` prints it).",
        *HYDRA_FLAGS.splitlines(),
    ]
    return "\n".join(lines)
