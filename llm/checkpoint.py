"""Every kind of checkpoint (language model, with or without LoRA, and classifier) in one place:
read, check, load, save and export, with errors that say what to do.

A checkpoint records its ``kind`` (written by the LightningModule) and its ``hyper_parameters``
(plain types, so ``torch.load(weights_only=True)`` reads it); loaders pick the class from the
kind, never from which keys happen to exist.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llm.io import atomic_open
from llm.model import GPT, GPTConfig
from llm.model.build import build_model
from llm.model.lora import lora_state_dict_merged
from llm.tokenizers import Tokenizer, tokenizer_from_dict

if TYPE_CHECKING:
    from llm.training.task import TaskModule

KINDS = ("lm", "classifier")
DISTRIBUTED_META = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
_HINT = "runs write logs/<train|finetune>/runs/<date>/checkpoints/last.ckpt"
# GPTConfig fields that may change on resume (they fix no weight and no computation's result)
_FREE_KEYS = ("dropout", "attn_impl")


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint of the kind asked for."""


def read_checkpoint(path: str | os.PathLike[str], key: str = "ckpt_path") -> dict[str, Any]:
    """The raw contents (weights_only, memory-mapped), checked to be one of ours.

    Memory-mapped: callers mostly want the hyper_parameters before Lightning loads the file
    again, so the tensors are not read twice. ``key`` names the setting in error messages.
    """
    path = Path(path)
    if is_distributed_checkpoint(path):
        raise CheckpointError(
            f"{key}={path} is a distributed checkpoint (a folder of one shard per process, "
            f"written by a sharded run: trainer=fsdp); make the single file this reads with "
            f"`llm export ckpt_path={path} out=<file>.ckpt`"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file ({_HINT})")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # empty, truncated, random bytes, a pickle of other objects
        raise CheckpointError(
            f"{key}={path} is not a checkpoint (torch.load could not read it: "
            f"{type(e).__name__}); {_HINT}"
        ) from e
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind not in KINDS or "state_dict" not in raw or "hyper_parameters" not in raw:
        raise CheckpointError(
            f"{key}={path} is not a llm checkpoint (no kind among {list(KINDS)}, "
            f"state_dict and hyper_parameters); {_HINT}"
        )
    verify_checkpoint(path, raw["state_dict"], key)
    return raw


def is_distributed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the folder a sharded run writes as a checkpoint (torch's distributed
    checkpoint: ``.metadata`` and one ``.distcp`` file per rank; Lightning's ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / DISTRIBUTED_META).is_file() and (path / ".metadata").is_file()


def read_resume_state(
    path: str | os.PathLike[str], sharded: bool = False, key: str = "ckpt_path"
) -> dict[str, Any]:
    """What a resume reads before Lightning loads the checkpoint (kind, hyper_parameters,
    global_step): a file's contents, or a distributed checkpoint's ``meta.pt``, which only a
    sharded run (``sharded``) resumes from."""
    if not is_distributed_checkpoint(path):
        return read_checkpoint(path, key)
    if not sharded:
        raise CheckpointError(
            f"{key}={path} is a distributed checkpoint (one shard per process): resume it with "
            f"a sharded strategy (trainer=fsdp), or make one file of it with `llm export "
            f"ckpt_path={path} out=<file>.ckpt` and resume from that"
        )
    return _read_meta(Path(path), key)


def _read_meta(folder: Path, key: str) -> dict[str, Any]:
    try:
        meta = torch.load(folder / DISTRIBUTED_META, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{key}={folder}: its {DISTRIBUTED_META} does not read ({type(e).__name__}: {e})"
        ) from e
    if not (isinstance(meta, dict) and meta.get("kind") in KINDS and "hyper_parameters" in meta):
        raise CheckpointError(f"{key}={folder} is a distributed checkpoint of another program")
    return meta


def consolidate(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """One checkpoint file from a distributed checkpoint: the full weights, the optimizer state
    in the layout an unsharded run saves (one list entry per optimizer, parameters by index),
    and everything else as it was. Every verb reads it; ``llm train ckpt_path=`` resumes from
    it on any number of processes.

    Read without a process group, on one process: the whole model must fit in host memory.
    """
    import warnings

    # torch's reader of a whole distributed checkpoint into one process (its dcp_to_torch_save
    # reads alike), with no process group: tensors as plain tensors, nested as saved
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    folder = Path(folder)
    meta = _read_meta(folder, "ckpt_path")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        state = _load_state_dict_from_keys(checkpoint_id=folder)
    optimizers = sorted((k for k in state if k.startswith("optimizer_")), key=lambda k: int(k[10:]))
    checkpoint = {
        **meta,
        "state_dict": state["state_dict"],
        "optimizer_states": [_by_index(state[k]) for k in optimizers],
    }
    bad = first_non_finite(checkpoint["state_dict"])
    if bad is not None:
        raise CheckpointError(f"ckpt_path={folder}: tensor {bad!r} holds NaN or inf")
    with atomic_open(out, "wb") as f:
        torch.save(checkpoint, f)
    return Path(out)


def _by_index(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (torch's distributed state dicts) keyed by
    index instead, numbered through the parameter groups in order, as
    ``Optimizer.state_dict()`` numbers them."""
    index: dict[str, int] = {}
    groups = []
    for group in optimizer_state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    state = {index[name]: value for name, value in optimizer_state["state"].items()}
    return {"state": state, "param_groups": groups}


# (device, inode, size, mtime) of the files verified in this process: a command reads its
# checkpoint two or three times (kind, resume check, Lightning), its bytes are checked once
_VERIFIED: set[tuple[int, int, int, int]] = set()


def verify_checkpoint(path: Path, state_dict: Any, key: str = "ckpt_path") -> None:
    """Refuse a checkpoint whose bytes changed since it was written, or whose weights are not
    finite, naming the file and the damaged member or tensor.

    torch.load with mmap checks no CRC, so a damaged tensor loads and only shows as
    ``perplexity: nan`` (or worse, as plausible numbers). Every member's CRC is checked
    (zipfile's testzip reads the whole file): 30 ms for a 50 MB checkpoint, 0.3 s for 500 MB
    (0.6 s a GB) from the page cache on the 2-core machine this was written on, so it is done
    whatever the size, once per file and process. Then every floating tensor of the state dict
    must be finite (torch.aminmax, which NaN and inf both show in): 0.3 s more for 500 MB read
    through the memory map.
    """
    stat = path.stat()
    seen = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if seen in _VERIFIED:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise CheckpointError(f"{key}={path} is damaged: its zip archive does not read: {e}") from e
    if damaged is not None:
        raise CheckpointError(
            f"{key}={path} is damaged: member {damaged!r} fails its CRC check (its bytes changed "
            "after it was written); use another checkpoint, e.g. an earlier one of the run"
        )
    bad = first_non_finite(state_dict) if isinstance(state_dict, dict) else None
    if bad is not None:
        raise CheckpointError(
            f"{key}={path}: tensor {bad!r} holds NaN or inf (training diverged before it was "
            "saved, or the file was altered); use another checkpoint, e.g. an earlier one"
        )
    _VERIFIED.add(seen)


def first_non_finite(state_dict: dict[str, Any]) -> str | None:
    """The name of the first floating tensor holding a NaN or an inf, else None."""
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        if tensor.numel() == 0:
            continue
        try:
            low, high = torch.aminmax(tensor)  # either is NaN or inf if any element is
            finite = bool(torch.isfinite(low)) and bool(torch.isfinite(high))
        except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8)
            finite = bool(torch.isfinite(tensor.float()).all())
        if not finite:
            return str(name)
    return None


def _module_class(kind: str) -> type[TaskModule]:
    if kind == "classifier":
        from llm.finetuning.classify import ClassifierModule

        return ClassifierModule
    from llm.training.module import GPTLitModule

    return GPTLitModule


def _refuse_kind(path: Any, found: str, wanted: str, key: str) -> None:
    if found != wanted:
        use = "llm classify" if found == "classifier" else "llm generate / llm evaluate"
        raise CheckpointError(
            f"{key}={path} is a {describe(found)} checkpoint, not a {describe(wanted)} one; "
            f"use {use} for it"
        )


@dataclass
class LanguageModel:
    """A checkpoint's GPT (LoRA adapters unmerged) and tokenizer, ready to sample."""

    model: GPT
    tokenizer: Tokenizer
    hparams: dict[str, Any]

    @property
    def template(self) -> str | None:
        """How it wants prompts rendered (:mod:`llm.prompts`): the instruct task's template
        ("alpaca" unless named), None for base models (and checkpoints older than the
        setting)."""
        return self.hparams.get("template")


def load_language_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", key: str = "ckpt_path"
) -> LanguageModel:
    """The model and tokenizer of a language-model checkpoint, in eval mode.

    Without Lightning: sampling and chatting start seconds sooner than ``load_checkpoint``.
    """
    raw = read_checkpoint(path, key)
    _refuse_kind(path, checkpoint_kind(raw), "lm", key)
    hp = raw["hyper_parameters"]
    if not hp.get("tokenizer"):
        raise CheckpointError(f"{key}={path} holds no tokenizer: it cannot encode text")
    model = build_model(hp["model"], hp.get("lora"))
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    model.to(map_location).eval()
    return LanguageModel(model, tokenizer_from_dict(hp["tokenizer"]), hp)


def checkpoint_kind(raw: dict[str, Any]) -> str:
    """``lm`` or ``classifier``."""
    return str(raw["kind"])


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    kind: str | None = None,
    key: str = "ckpt_path",
) -> TaskModule:
    """Rebuild the module (model, tokenizer, LoRA adapters unmerged) in eval mode.

    ``kind`` refuses any other kind with a message that names the command for it.
    """
    raw = read_checkpoint(path, key)
    found = checkpoint_kind(raw)
    del raw
    if kind is not None:
        _refuse_kind(path, found, kind, key)
    cls = _module_class(found)
    module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return module.eval()


def describe(kind: str) -> str:
    return {"lm": "language-model", "classifier": "classifier"}.get(kind, kind)


def save_checkpoint(module: TaskModule, path: str | os.PathLike[str]) -> Path:
    """A checkpoint of ``module``'s weights and settings that every loader here reads
    (written atomically; no optimizer state, so it starts runs rather than resuming them)."""
    import lightning as L

    checkpoint: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
        "global_step": 0,
        "epoch": 0,
    }
    module.on_save_checkpoint(checkpoint)
    with atomic_open(path, "wb") as f:
        torch.save(checkpoint, f)
    return Path(path)


def _model_fields(model: dict[str, Any]) -> dict[str, Any]:
    """The GPTConfig fields with the derived sizes filled in, so a checkpoint written with
    ``head_dim: null`` matches a run that reads 64 (GPTConfig sets them since); as stored
    where they are no valid config."""
    try:
        return GPTConfig(**model).to_dict()
    except (TypeError, ValueError):
        return dict(model)


def check_resumable(
    path: str | os.PathLike[str], module: TaskModule, max_steps: int, sharded: bool = False
) -> None:
    """Refuse, before Lightning's opaque size-mismatch traceback, to resume another model.

    Resuming needs the same kind, architecture and tokenizer (same ids for the same text),
    and steps left to take; the error names every field that differs and what to do.
    ``sharded``: this run shards its weights (it may resume from a distributed checkpoint).
    """
    raw = read_resume_state(path, sharded)
    if checkpoint_kind(raw) != module.kind:
        raise CheckpointError(
            f"ckpt_path={path} is a {describe(checkpoint_kind(raw))} checkpoint; this run "
            f"trains a {describe(module.kind)} (resume it with the command that wrote it)"
        )
    hp = raw["hyper_parameters"]
    theirs, ours = _model_fields(hp["model"]), _model_fields(module.hparams["model"])
    diffs = [
        f"model.{k}: checkpoint {theirs.get(k)!r}, this run {ours.get(k)!r}"
        for k in sorted(set(ours) | set(theirs))
        if k not in _FREE_KEYS and theirs.get(k) != ours.get(k)
    ]
    if hp.get("tokenizer") != module.hparams["tokenizer"]:
        theirs, mine = hp.get("tokenizer") or {}, module.hparams["tokenizer"] or {}
        diffs.append(
            f"tokenizer: checkpoint {theirs.get('kind')!r} ({theirs.get('name', '')}), "
            f"this run {mine.get('kind')!r} ({mine.get('name', '')}) or a different vocabulary"
        )
    for key in ("labels", "lora", "template"):  # a template renders other prompts
        if hp.get(key) != module.hparams.get(key):
            diffs.append(f"{key}: checkpoint {hp.get(key)!r}, this run {module.hparams.get(key)!r}")
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: it holds a different model or task:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the overrides the checkpoint was trained with (its run folder's "
            ".hydra/overrides.yaml), or start a new run without ckpt_path"
        )
    step = int(raw.get("global_step", 0))
    if step >= max_steps:
        raise CheckpointError(
            f"ckpt_path={path} is at step {step}, and trainer.max_steps={max_steps}: nothing "
            f"left to train. Raise trainer.max_steps above {step} to train on"
        )


def export_merged(ckpt_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Fold LoRA adapters into the base weights and write a checkpoint without LoRA.

    The export keeps its kind: a language model loads with `llm generate`, a classifier with
    `llm classify`. Logits are unchanged up to float rounding.
    """
    if Path(out).exists() and Path(ckpt_path).exists() and os.path.samefile(ckpt_path, out):
        raise CheckpointError(
            f"out={out} is ckpt_path={ckpt_path}: the merge is written to another file, never "
            "over its input"
        )
    raw = read_checkpoint(ckpt_path)
    hp = dict(raw["hyper_parameters"])
    lora = hp.get("lora")
    if not lora:
        raise CheckpointError(
            f"ckpt_path={ckpt_path} has no LoRA adapters: it is a plain checkpoint already"
        )
    merged = {
        "kind": raw["kind"],
        "state_dict": lora_state_dict_merged(raw["state_dict"], float(lora["alpha"]) / lora["r"]),
        "hyper_parameters": {**hp, "lora": None},
        "pytorch-lightning_version": raw.get("pytorch-lightning_version", "2.0.0"),
        "global_step": raw.get("global_step", 0),
        "epoch": raw.get("epoch", 0),
    }
    with atomic_open(out, "wb") as f:
        torch.save(merged, f)
    return Path(out)
