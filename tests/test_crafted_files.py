"""Crafted or damaged files, through the `llm` command: a file name read from a file stays in its
folder, an export never destroys what it was not asked to replace, and damaged data is refused
with a message that names the file and the entry, never trusted (issue 18)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import ALPHABET, TINY, char_checkpoint, write_corpus


def _fails(llm_main: Any, capsys: pytest.CaptureFixture, verb: str, *args: str) -> str:
    """Run `llm <verb> <args>`; it must fail in a few lines without a traceback."""
    assert llm_main(verb, *args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("Error: "), err
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) <= 4, err
    assert "weights_only=False" not in err
    return err


def _val_loss(out: str) -> float:
    return float(out.split("val_loss: ")[1].split()[0])


# -- 1. a token cache's file names stay in the cache folder ---------------------------------


@pytest.fixture
def evaluated(tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    """`llm evaluate` of a char checkpoint on a small corpus: its arguments, its val loss, its
    token cache folder, and a file of valid ids outside that folder, of the shard's size."""
    ckpt = char_checkpoint(tmp_path / "lm.ckpt", block_size=32)
    args = [
        f"ckpt_path={ckpt}",
        "data=text_files",
        f"data.path={write_corpus(tmp_path)}",
        f"paths.data_dir={tmp_path / 'data'}",
        "data.batch_size=4",
        "limit_batches=2",
        "device=cpu",
    ]
    assert llm_main("evaluate", *args) == 0
    (meta_path,) = (tmp_path / "data" / "cache").glob("*/meta.json")
    meta = json.loads(meta_path.read_text())
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.zeros(meta["shards"][0]["tokens"], dtype=meta["dtype"]).tobytes())
    loss = _val_loss(capsys.readouterr().out)
    return {"args": args, "loss": loss, "folder": meta_path.parent, "outside": outside}


def _absolute(folder: Path, outside: Path) -> str:
    return str(outside)


def _up(folder: Path, outside: Path) -> str:
    return os.path.relpath(outside, folder)  # ../../../outside.bin


def _down_and_up(folder: Path, outside: Path) -> str:
    return "shard-000000.bin/../" + os.path.relpath(outside, folder)


def _link(folder: Path, outside: Path) -> str:
    (folder / "shard-link.bin").symlink_to(outside)
    return "shard-link.bin"


NAMES = [
    (_absolute, "is an absolute path"),
    (_up, "goes up out of the folder (..)"),
    (_down_and_up, "goes up out of the folder (..)"),
    (_link, "outside the folder"),
]


@pytest.mark.parametrize(("crafted", "problem"), NAMES)
def test_a_meta_json_shard_outside_the_cache_is_never_read(
    crafted: Callable[[Path, Path], str],
    problem: str,
    evaluated: dict[str, Any],
    llm_main: Any,
    capsys: pytest.CaptureFixture,
) -> None:
    """The cache is invalid (check_cache names meta.json and the entry), a reader refuses it,
    and `llm evaluate` rebuilds it: the same loss as before, the outside file untouched."""
    from llm.data import check_cache, load_token_cache

    folder, outside = evaluated["folder"], evaluated["outside"]
    meta = json.loads((folder / "meta.json").read_text())
    name = crafted(folder, outside)
    meta["shards"][0]["file"] = name
    (folder / "meta.json").write_text(json.dumps(meta))
    reason = check_cache(folder)
    assert reason is not None and reason.startswith(f"meta.json's shard file {name!r}")
    assert problem in reason
    with pytest.raises(ValueError, match="is not usable") as refused:
        load_token_cache(folder)
    assert repr(name) in str(refused.value)

    before = outside.read_bytes()
    assert llm_main("evaluate", *evaluated["args"]) == 0
    assert _val_loss(capsys.readouterr().out) == evaluated["loss"]
    assert check_cache(folder) is None
    rebuilt = json.loads((folder / "meta.json").read_text())
    assert [s["file"] for s in rebuilt["shards"]] == ["shard-000000.bin"]
    assert outside.read_bytes() == before


@pytest.mark.parametrize(("crafted", "problem"), NAMES)
def test_a_progress_json_shard_outside_the_cache_is_never_resumed_from(
    crafted: Callable[[Path, Path], str],
    problem: str,
    evaluated: dict[str, Any],
    llm_main: Any,
    capsys: pytest.CaptureFixture,
) -> None:
    """A killed build (no meta.json) whose progress.json lists a file outside: the build starts
    over instead of taking that file as its finished shard."""
    folder, outside = evaluated["folder"], evaluated["outside"]
    (folder / "meta.json").unlink()
    progress = json.loads((folder / "progress.json").read_text())
    progress["shards"][0]["file"] = crafted(folder, outside)
    (folder / "progress.json").write_text(json.dumps(progress))
    before = outside.read_bytes()
    assert llm_main("evaluate", *evaluated["args"]) == 0
    assert _val_loss(capsys.readouterr().out) == evaluated["loss"]
    progress = json.loads((folder / "progress.json").read_text())
    assert [s["file"] for s in progress["shards"]] == ["shard-000000.bin"]
    assert outside.read_bytes() == before


@pytest.mark.slow
def test_train_rebuilds_a_cache_whose_meta_json_points_outside(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """`llm train` goes through the same check: the crafted entry is rebuilt, not read."""
    from helpers import tiny_overrides

    from llm.data import check_cache

    corpus = write_corpus(tmp_path)
    args = [*tiny_overrides(tmp_path, corpus), "trainer.max_steps=1",
            "trainer.limit_val_batches=1", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    prepare = ["tokenizer=char", "data=text_files", f"data.path={corpus}",
               f"paths.data_dir={tmp_path / 'data'}"]  # fmt: skip
    assert llm_main("prepare", *prepare) == 0
    (meta_path,) = (tmp_path / "data" / "cache").glob("*/meta.json")
    meta = json.loads(meta_path.read_text())
    outside = tmp_path / "outside.bin"
    outside.write_bytes(bytes(meta["shards"][0]["tokens"] * np.dtype(meta["dtype"]).itemsize))
    meta["shards"][0]["file"] = str(outside)
    meta_path.write_text(json.dumps(meta))
    assert llm_main("train", *args) == 0, capsys.readouterr().err
    assert check_cache(meta_path.parent) is None
    assert json.loads(meta_path.read_text())["shards"][0]["file"] == "shard-000000.bin"


def test_a_shard_with_ids_beyond_the_vocabulary_is_rebuilt(
    evaluated: dict[str, Any], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """Garbage of the right size: refused by name and id, rebuilt, not an IndexError."""
    from llm.data import check_cache, load_token_cache

    folder = evaluated["folder"]
    meta = json.loads((folder / "meta.json").read_text())
    shard = folder / "shard-000000.bin"
    ids = np.fromfile(shard, dtype=meta["dtype"])
    ids[len(ids) // 2] = 60000
    ids.tofile(shard)
    vocab = meta["vocab_size"]
    want = f"shard-000000.bin holds id 60000, not below meta.json's vocab_size {vocab}"
    assert check_cache(folder) == want + ": the file is damaged"
    with pytest.raises(ValueError, match=want):
        load_token_cache(folder)
    assert llm_main("evaluate", *evaluated["args"]) == 0
    assert _val_loss(capsys.readouterr().out) == evaluated["loss"]
    assert int(np.fromfile(shard, dtype=meta["dtype"]).max()) < vocab


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is not a file name"),
        (".", "is not a file name"),
        (7, "is not a file name"),
        ("/etc/passwd", "is an absolute path"),
        ("a/../../b", "goes up out of the folder (..)"),
    ],
)
def test_confined_names_the_file_and_entry(tmp_path: Path, name: Any, problem: str) -> None:
    from llm.io import OutsideFolderError, confined

    assert confined(tmp_path, "sub/shard.bin", "x") == tmp_path / "sub" / "shard.bin"
    with pytest.raises(OutsideFolderError) as e:
        confined(tmp_path, name, "meta.json's shard file")
    assert str(e.value) == (
        f"meta.json's shard file {name!r} {problem}: only files inside {tmp_path} are read from it"
    )


# -- 2. a Hugging Face folder: index names stay in it, broken files are named ---------------


def _sharded_model(folder: Path) -> dict[str, str]:
    """A tiny GPT-2 folder whose weights are one shard listed by model.safetensors.index.json;
    returns the index's weight_map."""
    from safetensors.torch import load_file

    from llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=50, block_size=16, **TINY)).save_pretrained(folder)
    shard = "model-00001-of-00001.safetensors"
    (folder / "model.safetensors").rename(folder / shard)
    weight_map = dict.fromkeys(sorted(load_file(folder / shard)), shard)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_a_sharded_hugging_face_folder_loads(tmp_path: Path) -> None:
    from llm.model import GPT

    _sharded_model(tmp_path / "hf")
    model = GPT.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 50 and model.config.n_layer == 2


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("../outside.safetensors", "goes up out of the folder (..)"),
        ("sub/../../outside.safetensors", "goes up out of the folder (..)"),
        ("ABSOLUTE", "is an absolute path"),
    ],
)
def test_an_index_entry_outside_the_model_folder_is_refused(
    entry: str, problem: str, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    folder = tmp_path / "hf"
    weight_map = _sharded_model(folder)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model-00001-of-00001.safetensors", outside)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    weight_map["transformer.wte.weight"] = entry
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    err = _fails(llm_main, capsys, "evaluate", f"init={folder}", "device=cpu")
    assert err.splitlines()[0] == (
        f"Error: {index}: weight_map['transformer.wte.weight'] = {entry!r} {problem}: only "
        f"files inside {folder} are read from it"
    )


def _no_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return f"Error: {folder} has no config.json: a Hugging Face model folder holds config.json"


def _bad_config(folder: Path) -> str:
    (folder / "config.json").write_text('{"model_type": "gpt2",')
    return f"Error: {folder / 'config.json'} is not valid JSON (Expecting property name"


def _bad_index(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text("{weight_map")
    return f"Error: {folder / 'model.safetensors.index.json'} is not valid JSON"


def _pickled_bin(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    torch.save({"weights": {}, "where": Path("x")}, folder / "pytorch_model.bin")
    return (
        f"Error: {folder / 'pytorch_model.bin'} is a pickle of more than plain tensors, and "
        "pickles can run code: only safetensors files (and a pytorch_model.bin of plain "
        "tensors) are read; convert it with transformers where you trust it: "
        "model.save_pretrained(dir, safe_serialization=True)"
    )


def _truncated_safetensors(folder: Path) -> str:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    return f"Error: {file} is not a readable safetensors file"


@pytest.mark.parametrize(
    "damage", [_no_config, _bad_config, _bad_index, _pickled_bin, _truncated_safetensors]
)
def test_a_broken_hugging_face_folder_is_named(
    damage: Callable[[Path], str], tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    from llm.model import GPT, GPTConfig

    folder = tmp_path / "hf"
    GPT(GPTConfig(vocab_size=50, block_size=16, **TINY)).save_pretrained(folder)
    want = damage(folder)
    err = _fails(llm_main, capsys, "evaluate", f"init={folder}", "device=cpu")
    assert err.splitlines()[0].startswith(want), err


def test_a_broken_tokenizer_config_is_named(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    from _hf_utils import train_tokenizer

    folder = train_tokenizer(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("{'eos_token': 1}")
    args = ("tokenizer=hf", f"tokenizer.path={folder}", "text=hi")
    err = _fails(llm_main, capsys, "tokenize", *args)
    assert f"{folder / 'tokenizer_config.json'} is not valid JSON" in err
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer.json").write_text('{"model": 1}')
    err = _fails(llm_main, capsys, "tokenize", *args)
    assert f"{folder / 'tokenizer.json'} is not a tokenizer that `tokenizers` reads" in err


# -- 3. export replaces nothing it was not asked to, and never its input ---------------------


def _lora_checkpoint(path: Path) -> Path:
    from llm.checkpoint import save_checkpoint
    from llm.tokenizers import CharTokenizer
    from llm.training.module import GPTLitModule

    tok = CharTokenizer()
    tok.fit([ALPHABET])
    torch.manual_seed(0)
    module = GPTLitModule(
        model={**TINY, "block_size": 16, "vocab_size": tok.vocab_size},
        tokenizer=tok.to_dict(),
        lora={"r": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["attn.c_attn"]},
    )
    return save_checkpoint(module, path)


@pytest.mark.parametrize("overwrite", [[], ["overwrite=true"]])
def test_export_never_overwrites_its_input(
    overwrite: list[str], tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """Not a resumable LoRA run replaced by its merge, not a run folder holding it replaced by
    a Hugging Face folder: whatever overwrite says."""
    ckpt = _lora_checkpoint(tmp_path / "run" / "last.ckpt")
    before = ckpt.read_bytes()
    link = tmp_path / "link.ckpt"
    link.symlink_to(ckpt)
    for out in (ckpt, link):
        err = _fails(llm_main, capsys, "export", f"ckpt_path={ckpt}", f"out={out}", *overwrite)
        assert err.splitlines()[0] == (
            f"Error: out={out} is ckpt_path={ckpt}, which export never overwrites (not even "
            "with overwrite=true): choose another out"
        )
    plain = char_checkpoint(tmp_path / "run" / "plain.ckpt")
    hf_dir = tmp_path / "run"
    err = _fails(llm_main, capsys, "export", f"ckpt_path={plain}", f"hf_dir={hf_dir}", *overwrite)
    assert f"hf_dir={hf_dir} holds ckpt_path={plain}, which export never overwrites" in err
    assert ckpt.read_bytes() == before and plain.is_file()


def _file(path: Path) -> Path:
    path.write_text("not mine to replace")
    return path


def _stale_folder(path: Path) -> Path:
    path.mkdir()
    (path / "stale.txt").write_text("from an older export")
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize(
    ("key", "existing", "message"),
    [
        ("out", _file, "Error: out={path} exists; add overwrite=true to replace it"),
        ("hf_dir", _stale_folder, "Error: hf_dir={path} exists; add overwrite=true to replace "
                                  "it (the whole folder: none of its files are kept)"),
        ("hf_dir", _file, "Error: hf_dir={path} is a file; hf_dir= names a folder to write "
                          "config.json and model.safetensors into"),
        ("out", _stale_folder, "Error: out={path} is a folder; out= names the merged checkpoint "
                               "file, e.g. out={path}/merged.ckpt"),
    ],
)  # fmt: skip
def test_export_refuses_to_replace_what_exists(
    key: str,
    existing: Callable[[Path], Path],
    message: str,
    tmp_path: Path,
    llm_main: Any,
    capsys: pytest.CaptureFixture,
) -> None:
    ckpt = _lora_checkpoint(tmp_path / "lora.ckpt")
    path = existing(tmp_path / "dest")
    args = [f"ckpt_path={ckpt}", f"{key}={path}"]
    if key == "hf_dir":
        args.append(f"out={tmp_path / 'merged.ckpt'}")
    err = _fails(llm_main, capsys, "export", *args)
    assert err.splitlines()[0] == message.format(path=path)
    assert not (tmp_path / "merged.ckpt").exists()  # refused before anything was written
    if path.is_file():
        assert path.read_text() == "not mine to replace"
    else:
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "stale.txt"]


def test_a_destination_under_a_file_is_named(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    ckpt = _lora_checkpoint(tmp_path / "lora.ckpt")
    parent = _file(tmp_path / "notes.txt")
    for key in ("out", "hf_dir"):
        err = _fails(llm_main, capsys, "export", f"ckpt_path={ckpt}", f"{key}={parent / 'x'}")
        assert f"{key}={parent / 'x'}: {parent} is a file, not a folder" in err
        assert "Errno" not in err


def test_overwrite_must_be_true_or_false(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    ckpt = _lora_checkpoint(tmp_path / "lora.ckpt")
    err = _fails(llm_main, capsys, "export", f"ckpt_path={ckpt}", "out=m.ckpt", "overwrite=yes")
    want = "Error: overwrite='yes': must be true or false, e.g. overwrite=true"
    assert err.splitlines()[0] == want


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_export_with_overwrite_replaces_whole_and_with_the_users_permissions(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """overwrite=true: the old folder's stale files are gone, the new files and folder have
    the modes the umask gives (not mkstemp's 0600 / mkdtemp's 0700), and no temp is left."""
    from llm.checkpoint import load_checkpoint
    from llm.model import GPT

    ckpt = _lora_checkpoint(tmp_path / "lora.ckpt")
    out, hf_dir = _file(tmp_path / "merged.ckpt"), _stale_folder(tmp_path / "hf")
    args = [f"ckpt_path={ckpt}", f"out={out}", f"hf_dir={hf_dir}", "overwrite=true"]
    mask = os.umask(0o027)
    try:
        assert llm_main("export", *args) == 0
    finally:
        os.umask(mask)
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "gpt2"
    assert _mode(hf_dir) == 0o750
    assert _mode(out) == _mode(hf_dir / "model.safetensors") == 0o640
    assert _mode(hf_dir / "config.json") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "lora.ckpt", "merged.ckpt"]
    merged = load_checkpoint(out, kind="lm")
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_pretrained(hf_dir)(x)[0], merged(x)[0])
    assert llm_main("export", f"ckpt_path={out}", f"hf_dir={tmp_path / 'empty'}") == 0


# -- 4. a damaged checkpoint is refused, never trusted ---------------------------------------


def _largest_member(path: Path) -> tuple[str, int, int]:
    """(name, offset in the file, size) of the checkpoint's largest tensor record."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)  # fmt: skip
        data = archive.read(info)
    offset = path.read_bytes().find(data)
    assert offset > 0
    return info.filename, offset, info.file_size


@pytest.mark.parametrize("damage", ["zeroed", "random"])
def test_a_checkpoint_with_damaged_bytes_is_refused(
    damage: str, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """5 KB inside a tensor zeroed or randomised: torch.load (mmap) reads it without a word."""
    ckpt = char_checkpoint(tmp_path / "lm.ckpt")
    member, offset, size = _largest_member(ckpt)
    assert size > 10_000
    raw = bytearray(ckpt.read_bytes())
    start = offset + size // 2 - 2500
    new = bytes(5000) if damage == "zeroed" else np.random.default_rng(0).bytes(5000)
    raw[start : start + 5000] = new
    ckpt.write_bytes(bytes(raw))
    torch.load(ckpt, weights_only=True, mmap=True)  # the damage torch does not see
    for verb in ("evaluate", "generate"):
        err = _fails(llm_main, capsys, verb, f"ckpt_path={ckpt}")
        assert err.splitlines()[0] == (
            f"Error: ckpt_path={ckpt} is damaged: member {member!r} fails its CRC check (its "
            "bytes changed after it was written); use another checkpoint, e.g. an earlier one "
            "of the run"
        )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused(
    value: float, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    ckpt = char_checkpoint(tmp_path / "lm.ckpt")
    raw = torch.load(ckpt, weights_only=True)
    raw["state_dict"]["model.h.1.mlp.c_fc.weight"][3, 5] = value
    torch.save(raw, ckpt)
    finetune = [
        "task=text",
        f"data.path={write_corpus(tmp_path)}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    for verb, key, args in (("evaluate", "ckpt_path", []), ("finetune", "init", finetune)):
        err = _fails(llm_main, capsys, verb, f"{key}={ckpt}", *args)
        assert err.splitlines()[0] == (
            f"Error: {key}={ckpt}: tensor 'model.h.1.mlp.c_fc.weight' holds NaN or inf "
            "(training diverged before it was saved, or the file was altered); use another "
            "checkpoint, e.g. an earlier one"
        )
