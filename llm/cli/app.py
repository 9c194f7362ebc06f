"""What makes a verb a Hydra app: the decorator, free-text quoting, argv and device choice.

Every verb module defines ``main`` with :func:`hydra_app`; the ``llm`` dispatcher
(:mod:`llm.cli`) hands it the words after the verb. Nothing here imports torch or Lightning, so
``llm <verb> --help`` stays fast.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig, OmegaConf

from llm import checks
from llm.ranks import other_rank_overrides
from llm.sweeps.jobs import is_multirun, swept_keys

# The package's own configs (llm/conf/, shipped in the wheel; the checkout's conf/ links to it)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
T = TypeVar("T")

# The command line as the user typed it (`llm train ...`), which Lightning's DDP launcher
# re-runs for every rank; Hydra itself is shown only the words after the verb.
_argv: list[str] | None = None
# The error a single run failed with, raised again once Hydra has returned (Hydra would print
# its own lines about a failed job first).
_failure: BaseException | None = None
# HYDRA_FULL_ERROR as the user set it (run_verb sets it for Hydra while a verb runs)
_user_debug = False


def run_name(overrides: str | None, experiment: str | None, limit: int = 64) -> str:
    """The part of a run folder's name after its date: ``_<overrides>``, else
    ``_<experiment>``; safe for a file name, and cut after whole overrides (``,+N``)."""
    if experiment and overrides == f"experiment={experiment}":
        overrides = None  # `llm train` alone: the recipe its verb chose, named as such
    label = re.sub(r"[^\w.,=+\-\[\]]", "_", str(overrides or experiment or ""))
    if len(label) > limit:
        items = re.split(r",(?=[\w.+\-]+=)", label)  # commas inside values stay
        kept = [items[0][:limit]]
        for item in items[1:]:
            if len(",".join([*kept, item])) > limit:
                break
            kept.append(item)
        label = ",".join(kept) + f",+{len(items) - len(kept)}"
    return f"_{label}" if label else ""


OmegaConf.register_new_resolver("llm_run_name", run_name, replace=True)


# choosing one of these on the command line (`model=baby`) opts out of a verb's recipe
RECIPE_GROUPS = ("experiment", "hparams_search", "model", "tokenizer", "data", "trainer", "optim")


def with_recipe(recipe: str | None, args: Sequence[str]) -> list[str]:
    """``args`` with a verb's recipe (``experiment=<recipe>``) as the first override, unless
    they choose a group of RECIPE_GROUPS themselves; flags (``-m``) and ``key.sub=value`` keys
    do not. Flags and their values stay in front: Hydra's parser takes the overrides as one
    run of positional arguments, so ``experiment=x -m a=1`` would be refused."""
    overrides = [not a.startswith("-") and ("=" in a or a.startswith("~")) for a in args]
    chosen = {a.split("=", 1)[0].lstrip("+~") for a, o in zip(args, overrides, strict=True) if o}
    if recipe is None or chosen & set(RECIPE_GROUPS):
        return list(args)
    at = overrides.index(True) if True in overrides else len(args)
    return [*args[:at], f"experiment={recipe}", *args[at:]]


def job_name(num: int, overrides: Sequence[str], limit: int = 64) -> str:
    """A sweep job's folder (its name in TensorBoard and HPARAMS): ``<num>_<swept values>``,
    e.g. ``0_lr=0.001,norm=rmsnorm``. The constants of the sweep are left out (each job's
    .hydra/overrides.yaml keeps them) and a key is cut to its last part unless two swept keys
    share it; with nothing swept, the job's overrides as a run folder names them."""
    swept = swept_keys(sys.argv[1:])
    items = [str(o).split("=", 1) for o in overrides if "=" in str(o)]
    items = [(k.lstrip("+~"), v) for k, v in items if k.lstrip("+~") in swept]
    if not items:
        return f"{num}{run_name(','.join(str(o) for o in overrides), None, limit)}"
    last = [k.rsplit(".", 1)[-1] for k, _ in items]
    short = [s if last.count(s) == 1 else k for s, (k, _) in zip(last, items, strict=True)]
    label = ",".join(f"{k}={v}" for k, (_, v) in zip(short, items, strict=True))
    return f"{num}{run_name(label, None, limit)}"


OmegaConf.register_new_resolver("llm_job_name", job_name, replace=True)


def run_dir(ckpt_path: str | None, new: str) -> str:
    """The run folder a run writes to: the one ``ckpt_path`` lies in when it is a checkpoint of
    a run folder (``<run>/checkpoints/last.ckpt``), so a resumed run continues its own folder
    (log, curves, checkpoints); else ``new``. ``hydra.run.dir=`` still decides when given."""
    if ckpt_path:
        ckpt = Path(str(ckpt_path))
        run = ckpt.parent.parent
        if ckpt.parent.name == "checkpoints" and (run / ".hydra" / "config.yaml").is_file():
            return str(run)
    return new


OmegaConf.register_new_resolver("llm_run_dir", run_dir, replace=True)


def hydra_app(config_name: str) -> Callable[[Callable[[DictConfig], T]], Callable[[], T]]:
    """``hydra.main`` for a verb, with the user's own command line back in ``sys.argv``
    while the task runs (so re-launched DDP ranks run ``llm <verb> ...`` again), and a
    failure's traceback written to the run folder's log file rather than the console."""

    def decorate(task: Callable[[DictConfig], T]) -> Callable[[], T]:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> T | None:
            global _failure
            hydra_argv = sys.argv
            if _argv is not None:
                sys.argv = list(_argv)
            quiet_other_ranks()
            try:
                if config_name in OWN_TOKENIZER and "tokenizer" in cfg:  # +tokenizer=gpt2
                    raise ValueError(no_tokenizer_key(config_name, _tokenizer_override()))
                return task(cfg)
            except Exception as e:
                if getattr(e, "log_in_run_folder", True):  # not into another run's log
                    log_failure(e)
                if is_multirun():  # the sweeper records the failed job and decides what next
                    raise
                # with HYDRA_FULL_ERROR=1 the folder stays, its log keeping the traceback; a
                # folder another run holds (RunFolderBusy) is that run's, never touched
                if not _user_debug and getattr(e, "log_in_run_folder", True):
                    discard_unused_run_folder()
                _failure = e
                return None
            finally:
                sys.argv = hydra_argv

        return hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(run)

    return decorate


def _tokenizer_override() -> str:
    """The tokenizer override on this command line, as typed (``+tokenizer=gpt2``)."""
    from hydra.core.hydra_config import HydraConfig

    typed = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return next((str(o) for o in typed if str(o).lstrip("+~").startswith("tokenizer")),
                "tokenizer=...")  # fmt: skip


def run_verb(main: Callable[[], Any], args: Sequence[str], free_text: Sequence[str] = ()) -> Any:
    """Run a verb's ``main`` on ``args`` (the words after the verb), quoting free-text keys.

    Errors propagate (Hydra is told to raise them rather than print them itself), so the
    ``llm`` command prints them one way: :func:`report_error`.
    """
    global _argv, _failure, _user_debug
    _argv, _failure = list(sys.argv), None
    hydra_argv = [sys.argv[0], *(quote_free_text(a, free_text) for a in args)]
    hydra_argv += other_rank_overrides(hydra_argv[1:])  # torchrun's and srun's other ranks
    saved, sys.argv = sys.argv, hydra_argv
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    _user_debug = debug()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        result = main()
        if _failure is not None:
            raise _failure
        return result
    finally:
        sys.argv, _argv, _failure = saved, None, None
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


def quiet_other_ranks() -> None:
    """Under DDP only rank zero speaks: one copy of each line (warnings and errors aside)."""
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    if rank != "0":
        logging.getLogger().setLevel(logging.WARNING)


def quiet_libraries() -> None:
    """No noise on a normal run: Lightning's tips and accelerator census, its second console
    handler (each of its lines came twice), and dependencies' deprecation warnings."""
    import importlib
    import warnings

    importlib.import_module("lightning")  # its console handler exists once it is imported
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    quiet = "ignore::DeprecationWarning,ignore::FutureWarning"  # ddp_spawn's fresh interpreters
    inherited = os.environ.get("PYTHONWARNINGS", "")
    if quiet not in inherited:
        os.environ["PYTHONWARNINGS"] = f"{inherited},{quiet}" if inherited else quiet
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    own = logging.getLogger("lightning")
    for handler in list(own.handlers):  # its own stream handler; the root one stays
        if type(handler) is logging.StreamHandler:
            own.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Chatter) for f in logger.filters):
            logger.addFilter(_Chatter())


class _Chatter(logging.Filter):
    """Lightning's lines that say nothing about this run."""

    NOISE = ("💡", "TPU available", "HPU available", "LOCAL_RANK:", "`Trainer.fit` stopped")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOISE)


def log_failure(error: BaseException) -> None:
    """The traceback into the run's log file(s) only: the console gets a short message."""
    record = logging.LogRecord(
        "llm", logging.ERROR, __file__, 0, "run failed", None, (type(error), error, None)
    )
    record.exc_info = (type(error), error, error.__traceback__)
    to_log_files(record)


def to_log_files(record: logging.LogRecord) -> None:
    """``record`` into the run's log file(s) (the root logger's file handlers), not the console."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


# what Hydra and the run's start write into a run folder before any work is done
_START_FILES = (".hydra", "run.lock")


def discard_unused_run_folder() -> None:
    """Remove the run folder of a command refused before it wrote anything of its own (a wrong
    setting, a download that failed, nothing left to train): ``llm report`` would list it as a
    failed run. Only a folder this command made: Hydra's files, this session's log and lock;
    a run folder with checkpoints, curves or an earlier session's log is kept."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir).resolve()
    if folder == Path.cwd().resolve() or not (folder / ".hydra").is_dir():
        return  # the printing verbs run in "."; they make no run folder
    for entry in folder.iterdir():
        if entry.name in _START_FILES:
            continue
        if entry.suffix != ".log" or not entry.is_file():
            return
        with open(entry, encoding="utf-8", errors="replace") as f:
            if sum("][llm][INFO] - llm " in line for line in f) > 1:  # resumed before
                return
    root = logging.getLogger()
    for handler in list(root.handlers):  # the log file goes with the folder
        log_file = Path(getattr(handler, "baseFilename", "/"))
        if isinstance(handler, logging.FileHandler) and folder in log_file.parents:
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(folder, ignore_errors=True)


def debug() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``, Hydra's own switch)."""
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def report_error(error: BaseException, verb: str | None = None) -> str:
    """A failed command as a few lines: what went wrong and where, no traceback."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    own_tokenizer = checkpoint_tokenizer(error, verb)
    if own_tokenizer:
        return f"Error: {own_tokenizer}\nSet HYDRA_FULL_ERROR=1 for the traceback."
    if isinstance(error, InstantiationException) and isinstance(error.__cause__, ValueError):
        error = error.__cause__  # our own check, raised while Hydra built the object
    missing = error
    while missing is not None and not isinstance(missing, MissingMandatoryValue):
        missing = missing.__cause__ or missing.__context__
    if missing is not None:
        error = missing
    if isinstance(error, MissingMandatoryValue):
        key = getattr(error, "full_key", None) or "the key"
        return (
            f"Error: {key} is required and has no value: set it on the command line, "
            f"e.g. {key}=...\nSet HYDRA_FULL_ERROR=1 for the traceback."
        )
    # our messages say what to do; the exception they were raised from is in the traceback
    return f"Error: {describe_error(error)}\nSet HYDRA_FULL_ERROR=1 for the traceback."


# Verbs that read text with the checkpoint's own tokenizer: they have no tokenizer key, and
# Hydra's advice for one (`+tokenizer=...`) would add a group nothing reads.
OWN_TOKENIZER = ("evaluate", "generate", "chat", "classify", "serve", "inspect")


def checkpoint_tokenizer(error: BaseException, verb: str | None) -> str | None:
    """Hydra's "Could not override 'tokenizer...'" for such a verb, said in its terms (None for
    any other error)."""
    from hydra.errors import ConfigCompositionException

    if verb not in OWN_TOKENIZER or not isinstance(error, ConfigCompositionException):
        return None
    refused = re.match(r"Could not override '(tokenizer(?:\.[^']*)?)'", str(error))
    if refused is None:
        return None
    typed = re.search(r"use \+(\S+)", str(error))
    return no_tokenizer_key(verb, typed.group(1) if typed else refused.group(1) + "=...")


def no_tokenizer_key(verb: str, override: str) -> str:
    """Why ``override`` (``tokenizer=gpt2``) has no place on ``llm <verb>``'s command line."""
    key = override.lstrip("+").split("=", 1)[0]
    source = (
        "ckpt_path=, or the init= folder"
        if verb in ("evaluate", "serve", "inspect")
        else "ckpt_path="
    )
    return (
        f"llm {verb} has no {key} setting: the tokenizer comes from the checkpoint ({source}), "
        f"so text is read the way the model was trained; drop {override}"
    )


def describe_error(error: BaseException) -> str:
    """The message of ``error``; its type too where the message alone would not say much."""
    message = str(error).strip() or type(error).__name__
    if isinstance(error, ValueError | OSError | RuntimeError):  # ours, Hydra's, OmegaConf's
        return message
    return f"{type(error).__name__}: {message}"


def hydra_quote(text: str) -> str:
    """``text`` as a Hydra quoted value that OmegaConf reads back unchanged.

    Hydra's grammar reserves ``,`` (sweeps), quotes, ``!`` and more; OmegaConf reads ``${...}``
    as an interpolation. Inside double quotes only quotes (and the backslashes before one or
    at the end) need escaping, and ``\\${`` keeps a literal ``${``.
    """
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    text = re.sub(r'(\\+)(?="|$)', lambda m: m.group(1) * 2, text)
    return '"' + text.replace('"', '\\"') + '"'


# Keys that hold a path: run folders are named after their overrides (`..._seed=3`), and a
# bare `=` in a value is a Hydra grammar error, as are letters beyond ASCII, so such values are
# quoted too.
_PATH_KEY = re.compile(r"(^|\.)(\w*path|\w*dir|init|out|\w*_file)$")


def quote_free_text(arg: str, keys: Sequence[str]) -> str:
    """``prompt=Hello, world!`` -> ``prompt="Hello, world!"`` for the verb's free-text keys, and
    ``ckpt_path=runs/x_seed=3/last.ckpt`` quoted likewise for any path key that Hydra would
    not read back as typed.

    A value the user quoted for Hydra already (``prompt='"a, b"'``) is left as it is, as is a
    path Hydra reads as something else on purpose (``-m init=a.ckpt,b.ckpt`` still sweeps,
    ``ckpt_path=null`` is still null).
    """
    key, sep, value = arg.partition("=")
    bare = key.lstrip("+~")
    if not sep or (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
        return arg
    if bare in keys or (_PATH_KEY.search(bare) and _misread(value)):
        return f"{key}={hydra_quote(value)}"
    return arg


def _misread(value: str) -> bool:
    """Whether Hydra's grammar refuses ``key=value`` or reads it as another string (a space
    stripped): a value it reads as a sweep, a number or null was meant as one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_override(f"key={value}").value()
    except HydraException:
        return True
    return isinstance(parsed, str) and parsed != value


def read_free_text(cfg: DictConfig, key: str) -> str:
    """``cfg[key]``, or the file named by ``cfg[key + '_file']`` (``-``: standard input)."""
    path = cfg.get(f"{key}_file")
    if path is None:
        return str(cfg[key])
    if str(path) == "-":
        return sys.stdin.read()
    from llm.data.corpus import read_utf8

    try:
        return read_utf8(str(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key}_file={path}: no such file") from e


def sampling_settings(cfg: DictConfig) -> dict:
    """The sampling keys of generate and chat, checked (each error names its key)."""
    checks.integer("num_samples", cfg.get("num_samples", 1), minimum=1, example=3)
    return {
        "max_new_tokens": checks.integer("max_new_tokens", cfg.max_new_tokens, minimum=0),
        "temperature": checks.number("temperature", cfg.temperature, minimum=0.0, example=0.8),
        "top_k": checks.integer("top_k", cfg.top_k, minimum=1, nullable=True, example=200),
        "top_p": checks.number("top_p", cfg.top_p, above=0.0, maximum=1.0, nullable=True),
        "seed": checks.integer("seed", cfg.seed, nullable=True, example=1337),
    }


def model_source(cfg: DictConfig) -> tuple[str, str]:
    """("ckpt_path" | "init", its value): exactly one of the two is set (the verbs that read
    a checkpoint or Hugging Face weights alike: evaluate, serve, inspect)."""
    given = [(k, str(cfg[k])) for k in ("ckpt_path", "init") if cfg.get(k) is not None]
    if len(given) != 1:
        raise ValueError(
            "set exactly one of ckpt_path=<llm checkpoint> and init=<Hugging Face folder or hub "
            f"name>, got {', '.join(f'{k}={v}' for k, v in given) or 'neither'}"
        )
    return given[0]


def load_model_source(key: str, value: str, device: Any = "cpu") -> Any:
    """The LanguageModel that ``model_source`` names: an llm checkpoint, or Hugging Face
    weights (a folder or a hub name)."""
    if key == "ckpt_path":
        from llm.checkpoint import load_language_model

        return load_language_model(value, device)
    from llm.initial_weights import init_language_model

    return init_language_model(value, device)


def beside_model(key: str, value: str, name: str, setting: str) -> Path:
    """Where a verb writes what it made of a model: ``<run folder>/<name>`` for a checkpoint
    (its own folder when it is not in a run's checkpoints/), ``<folder>/<name>`` for an init=
    folder; a hub name has no folder, so ``setting`` (the key that says where) must be set."""
    path = Path(value)
    if key == "ckpt_path":
        return (path.parent.parent if path.parent.name == "checkpoints" else path.parent) / name
    if path.is_dir():
        return path / name
    raise ValueError(f"init={value} is not a local folder to write the results into: set {setting}")


def resolve_device(device: str) -> Any:
    """``auto`` picks CUDA when present, so one command works on laptops and GPU machines."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device} is not a device; use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}, but this machine has no CUDA GPU; use cpu or auto")
    return resolved
