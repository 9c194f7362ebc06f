"""``llm export ckpt_path=... [out=merged.ckpt] [hf_dir=folder/] [overwrite=true]``.

``out`` folds a LoRA checkpoint's adapters into plain weights (the same kind of checkpoint,
without LoRA), or makes one checkpoint file of a sharded run's distributed checkpoint (a
folder: ``trainer=fsdp``), which every other verb reads and a run of any size resumes from;
``hf_dir`` writes a language model as a Hugging Face folder
(config.json + model.safetensors) that ``transformers`` loads.

Nothing that exists is replaced unless ``overwrite=true``, and the input checkpoint never is.
Every check runs before anything is written; ``hf_dir`` is written whole beside its place and
then swapped in, so a replaced folder keeps no stale file of the old one.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from llm import checks
from llm.cli.app import hydra_app
from llm.io import inside


def same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file: the same inode (links, hard links) or, where one
    does not exist yet, the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_destination(
    key: str, path: Path, folder: bool, overwrite: bool, keep: dict[str, Path]
) -> None:
    """Refuse, before anything is written, a destination that is the wrong kind of thing, that
    would replace what exists without ``overwrite``, or that would replace a path in ``keep``
    (the input checkpoint, the other output) whatever ``overwrite`` says."""
    want = "a folder" if folder else "a checkpoint file"
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{key}={path}: {parent} is a file, not a folder; {key}= names {want}")
    for other, kept in keep.items():
        if same_path(path, kept) or (folder and inside(kept, path)):
            where = "is" if same_path(path, kept) else "holds"
            raise ValueError(
                f"{key}={path} {where} {other}={kept}, which export never overwrites (not even "
                f"with overwrite=true): choose another {key}"
            )
    if not path.exists():
        return
    if folder and not path.is_dir():
        raise ValueError(
            f"hf_dir={path} is a file; hf_dir= names a folder to write config.json and "
            "model.safetensors into"
        )
    if not folder and path.is_dir():
        raise ValueError(
            f"out={path} is a folder; out= names the merged checkpoint file, "
            f"e.g. out={path / 'merged.ckpt'}"
        )
    if folder and not any(path.iterdir()):
        return  # an empty folder: nothing in it to replace
    if not overwrite:
        what = " (the whole folder: none of its files are kept)" if folder else ""
        raise ValueError(f"{key}={path} exists; add overwrite=true to replace it{what}")


@hydra_app("export")
def main(cfg: DictConfig) -> None:
    """Check the destinations and the checkpoint, then export and print where each file went."""
    from llm.checkpoint import (
        consolidate,
        describe,
        export_merged,
        is_distributed_checkpoint,
        load_checkpoint,
        read_resume_state,
    )
    from llm.io import replaced_folder

    if cfg.out is None and cfg.hf_dir is None:
        raise ValueError("say what to export: out=<merged.ckpt> and/or hf_dir=<folder>")
    overwrite = checks.flag("overwrite", cfg.get("overwrite", False))
    ckpt = Path(str(cfg.ckpt_path))
    out = None if cfg.out is None else Path(str(cfg.out))
    hf_dir = None if cfg.hf_dir is None else Path(str(cfg.hf_dir))
    if out is not None:
        check_destination("out", out, False, overwrite, {"ckpt_path": ckpt})
    if hf_dir is not None:
        keep = {"ckpt_path": ckpt, **({"out": out} if out is not None else {})}
        check_destination("hf_dir", hf_dir, True, overwrite, keep)
    distributed = is_distributed_checkpoint(ckpt)
    if distributed and out is None:
        raise ValueError(
            f"ckpt_path={ckpt} is a distributed checkpoint (a sharded run's folder): add "
            "out=<file>.ckpt to make one checkpoint file of it (hf_dir= may follow)"
        )
    if distributed and inside(out, ckpt):
        raise ValueError(f"out={out} lies inside ckpt_path={ckpt}: write it elsewhere")
    raw = read_resume_state(ckpt, sharded=True)  # a folder's meta.pt: kind and settings
    kind, lora = raw["kind"], raw["hyper_parameters"].get("lora")
    del raw
    if hf_dir is not None and kind != "lm":
        raise ValueError(
            f"hf_dir= exports language models; ckpt_path={ckpt} is a {describe(kind)} checkpoint"
        )
    if hf_dir is not None and lora and (out is None or distributed):
        then = " (a distributed one: consolidate it with out= first, then merge that file)"
        raise ValueError(
            f"ckpt_path={ckpt} holds LoRA adapters: add out=<merged.ckpt> to merge them before "
            f"hf_dir={then if distributed else ''}"
        )
    source = ckpt
    if distributed:  # a LoRA run's keeps its adapters: export the file again to merge them
        print(f"consolidated checkpoint: {consolidate(ckpt, out)}")
        source = out
    elif out is not None:
        print(f"merged checkpoint: {export_merged(ckpt, out)}")
        source = out
    if hf_dir is not None:
        module = load_checkpoint(source, kind="lm")
        with replaced_folder(hf_dir) as tmp:
            module.model.save_pretrained(tmp)
        print(f"Hugging Face folder: {hf_dir}")
