"""Each user mistake, through the `llm` command: a non-zero exit, a few lines that name the key,
file or row and say how to fix it, and no traceback (that waits behind HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ALPHABET, TINY, char_checkpoint, tiny_overrides, write_corpus

FAST = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]


def _fails(
    llm_main: Any, capsys: pytest.CaptureFixture, verb: str, *args: str, lines: int = 4
) -> str:
    """Run `llm <verb> <args>`; it must fail in a few lines without a traceback."""
    assert llm_main(verb, *args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("Error: "), err
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) <= lines, err
    return err


@pytest.fixture
def corpus(tmp_path: Path) -> list[str]:
    return tiny_overrides(tmp_path, write_corpus(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.lr=abc", "optim.lr='abc': must be a finite number > 0.0, e.g. optim.lr=0.001"),
        ("data.batch_size=[1,2]", "data.batch_size=[1, 2]: must be an integer >= 1"),
        ("seed=abc", "seed='abc': must be an integer, e.g. seed=1337"),
        ("optim.warmup_steps=-10", "optim.warmup_steps=-10: must be an integer >= 0"),
        ("optim.min_lr=0.01", "optim.min_lr=0.01 is above optim.lr=0.0006"),
        ("optim.betas=[0.9]", "optim.betas=[0.9]: must be two numbers"),
        ("model.n_layer=abc", "model.n_layer='abc': must be an integer >= 1"),
        ("model.n_head=3", "model.n_embd=64 is not divisible by model.n_head=3"),
        ("model.norm=batchnorm", "unknown norm='batchnorm'"),
        ("trainer.max_steps=0", "trainer.max_steps=0: must be an integer >= 1"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5: must be between 0 and 1"),
    ],
)
def test_train_refuses_wrong_settings(
    override: str, named: str, corpus: list[str], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    err = _fails(llm_main, capsys, "train", *corpus, *FAST, override)
    assert named in err
    assert "HYDRA_FULL_ERROR=1" in err


@pytest.mark.slow
def test_train_refuses_a_context_no_window_fits(
    corpus: list[str], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """`model.block_size=200000`: no 200000 x 200000 mask is built; the data says no."""
    err = _fails(llm_main, capsys, "train", *corpus, *FAST, "model.block_size=200000")
    assert "block_size=200000 needs at least 200001" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ["prepare", "data=text_files", "tokenizer=char"],
        ["train", "data=text_files", "model=tiny"],
        ["finetune", "task=text", "init=gpt2"],
    ],
)
def test_missing_required_key_is_named(
    argv: list[str], tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    err = _fails(llm_main, capsys, *argv, f"paths.data_dir={tmp_path}", f"paths.log_dir={tmp_path}")
    assert err.splitlines()[0] == (
        "Error: data.path is required and has no value: set it on the command line, "
        "e.g. data.path=..."
    )


@pytest.mark.parametrize("content", [b"", b"\x00\x01 random bytes \xff" * 50, b"PK\x03\x04zip?"])
def test_a_file_that_is_not_a_checkpoint(
    content: bytes, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    for verb in ("generate", "evaluate"):
        err = _fails(llm_main, capsys, verb, f"ckpt_path={bad}")
        assert f"ckpt_path={bad} is not a checkpoint" in err and "mmap" not in err


@pytest.fixture
def classifier_ckpt(tmp_path: Path) -> Path:
    """A checkpoint of the classifier kind (the kind is recorded, so it is found out)."""
    path = char_checkpoint(tmp_path / "lm.ckpt")
    raw = torch.load(path, weights_only=True)
    raw["kind"] = "classifier"
    raw["hyper_parameters"].update(labels=["a", "b"], max_length=8, trainable_layers=None)
    torch.save(raw, tmp_path / "classifier.ckpt")
    return tmp_path / "classifier.ckpt"


@pytest.mark.slow
def test_a_checkpoint_of_another_kind_is_named(
    classifier_ckpt: Path, corpus: list[str], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    err = _fails(llm_main, capsys, "generate", f"ckpt_path={classifier_ckpt}")
    assert "is a classifier checkpoint, not a language-model one; use llm classify" in err
    err = _fails(llm_main, capsys, "train", *corpus, *FAST, f"ckpt_path={classifier_ckpt}")
    assert "is a classifier checkpoint; this run trains a language-model" in err


@pytest.mark.parametrize(
    ("arg", "named"),
    [
        ("top_k=abc", "top_k='abc': must be an integer >= 1 or null"),
        ("temperature=nan", "temperature=nan: must be a finite number >= 0.0"),
        ("temperature=-1", "temperature=-1: must be a finite number >= 0.0"),
        ("top_p=2", "top_p=2: must be a finite number > 0.0 and <= 1.0 or null"),
        ("max_new_tokens=1e9", "max_new_tokens=1000000000.0: must be an integer >= 0"),
        ("seed=x1", "seed='x1': must be an integer or null"),
    ],
)
def test_sampling_verbs_refuse_wrong_settings(
    arg: str, named: str, trained: dict[str, Any], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    for verb in ("generate", "chat"):
        err = _fails(llm_main, capsys, verb, f"ckpt_path={trained['ckpt']}", arg)
        assert named in err


@pytest.mark.slow
def test_resuming_a_finished_run_is_refused(
    trained: dict[str, Any], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """The checkpoint is at step 4 = trainer.max_steps: not a silent zero-step run."""
    args = [*trained["overrides"], f"ckpt_path={trained['ckpt']}"]
    err = _fails(llm_main, capsys, "train", *args)
    assert "is at step 4, and trainer.max_steps=4: nothing left to train" in err
    assert "Raise trainer.max_steps above 4" in err


# -- finetuning data ------------------------------------------------------------------------


def _finetune(tmp_path: Path, task: str, data: Path, *extra: str) -> list[str]:
    return [
        f"task={task}",
        f"init={char_checkpoint(tmp_path / 'init.ckpt')}",
        f"data.path={data}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "trainer.max_steps=2",
        *extra,
    ]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("text,label\nwin cash,spam\nsee you\nhi,ham\n", "sms.csv:3: 1 comma-separated fields"),
        ("text,label\nwin cash,spam\nhi,ham,extra\n", "sms.csv:3: 3 comma-separated fields"),
    ],
)
def test_csv_rows_with_a_missing_or_extra_field_are_named(
    content: str, named: str, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "sms.csv"
    path.write_text(content, encoding="utf-8")
    err = _fails(llm_main, capsys, "finetune", *_finetune(tmp_path, "classify", path))
    assert named in err and "the header has 2" in err


@pytest.mark.slow
@pytest.mark.parametrize(("name", "content"), [("sms.csv", "text,label\nna\xefve,ham\n")])
def test_a_file_that_is_not_utf8_is_named_with_the_byte_offset(
    name: str, content: str, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    err = _fails(llm_main, capsys, "finetune", *_finetune(tmp_path, "classify", path))
    assert f"{path} is not valid UTF-8: byte 0xef at byte offset 13" in err
    records = tmp_path / "records.json"
    records.write_bytes(b'[{"instruction": "caf\xe9", "output": "x"}]')
    err = _fails(llm_main, capsys, "finetune", *_finetune(tmp_path, "instruct", records))
    assert f"{records} is not valid UTF-8: byte 0xe9 at byte offset 21" in err
    err = _fails(llm_main, capsys, "tokenize", "tokenizer=char", "text=hi", f"fit_on={path}")
    assert f"{path} is not valid UTF-8" in err


def test_a_csv_with_a_byte_order_mark_reads_its_header(tmp_path: Path) -> None:
    from llm.finetuning.records import read_records

    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\nwin cash,spam\n".encode())
    (row,) = read_records(path)
    assert (row["text"], row["label"]) == ("win cash", "spam")


def test_instruction_data_with_only_empty_outputs_is_refused(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"instruction": "say hi", "output": " "}] * 4))
    err = _fails(llm_main, capsys, "finetune", *_finetune(tmp_path, "instruct", path))
    assert f"{path}: every record's output is empty" in err


def test_a_character_the_vocabulary_lacks_names_the_file_and_row(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "sms.tsv"
    rows = ["win cash\tspam", "see you ☺\tham", *["free prize\tspam", "hi there\tham"] * 3]
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    err = _fails(llm_main, capsys, "finetune", *_finetune(tmp_path, "classify", path))
    assert f"{path}:3, field 'text': unknown character '☺'" in err


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("jinja", "task.template='jinja' is not a prompt template; use one of ['alpaca', 'chat']"),
        ("chat", "template=chat needs a tokenizer with a chat template, but this CharTokenizer"),
    ],
)  # a char checkpoint has no chat template (an error raised while encoding the first record
# once went on to read an `input` field the record did not have: KeyError)
def test_an_instruct_template_the_checkpoint_cannot_render_is_named(
    template: str, named: str, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"instruction": "say hi", "output": "hi"}] * 4))
    args = _finetune(tmp_path, "instruct", path, f"task.template={template}")
    assert named in _fails(llm_main, capsys, "finetune", *args)


@pytest.mark.slow
def test_a_template_the_vocabulary_cannot_write_is_named(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """A char checkpoint that never saw '#' cannot write Alpaca's '### Response:'."""
    from llm.checkpoint import save_checkpoint
    from llm.tokenizers import CharTokenizer
    from llm.training.module import GPTLitModule

    tok = CharTokenizer()
    tok.fit([ALPHABET.replace("#", "")])
    module = GPTLitModule(model={**TINY, "block_size": 64, "vocab_size": tok.vocab_size},
                          tokenizer=tok.to_dict())  # fmt: skip
    init = save_checkpoint(module, tmp_path / "no-hash.ckpt")
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"instruction": "say hi", "output": "hi"}] * 4))
    args = [*_finetune(tmp_path, "instruct", path), f"init={init}"]
    err = _fails(llm_main, capsys, "finetune", *args)
    assert "cannot encode the Alpaca prompt template of task=instruct" in err and "['#']" in err


# -- settings refused before any data is read -----------------------------------------------


def _verb_args(verb: str, tmp_path: Path) -> list[str]:
    """A command line of `verb` that would run, on a small corpus in tmp_path."""
    corpus = write_corpus(tmp_path)
    if verb == "finetune":
        return _finetune(tmp_path, "text", corpus)
    if verb == "prepare":
        return ["data=text_files", "tokenizer=char", f"data.path={corpus}",
                f"paths.data_dir={tmp_path / 'data'}"]  # fmt: skip
    return [*tiny_overrides(tmp_path, corpus), *FAST]


EMPTY_PATH = "is empty: set it to a file, folder or glob, e.g. data.path=data/my_corpus.txt"
VAL_INTERVAL = (
    ": must be an integer >= 1 (training batches between validations) or a number in (0, 1] "
    "(a fraction of an epoch), e.g. trainer.val_check_interval=250"
)


@pytest.mark.parametrize(
    ("verb", "overrides", "named"),
    [
        ("train", ["data.path="], f"data.path='' {EMPTY_PATH}"),
        ("finetune", ["data.path=' '"], f"data.path=' ' {EMPTY_PATH}"),
        ("prepare", ["data.path="], f"data.path='' {EMPTY_PATH}"),
        ("train", ["trainer.val_check_interval=0"], f"trainer.val_check_interval=0{VAL_INTERVAL}"),
        ("finetune", ["trainer.val_check_interval=1.5"], "trainer.val_check_interval=1.5: must"),
        ("finetune", ["lora=default", "lora.alpha=nan"],
         "lora.alpha=nan: must be a finite number > 0.0, e.g. lora.alpha=16"),
        ("finetune", ["lora=default", "lora.r=0"],
         "lora.r=0: must be an integer >= 1, e.g. lora.r=8"),
        ("finetune", ["lora=default", "lora.dropout=1"],
         "lora.dropout=1: must be a finite number >= 0.0 and < 1.0"),
    ],
)  # fmt: skip
def test_settings_refused_before_any_data_is_read(
    verb: str,
    overrides: list[str],
    named: str,
    tmp_path: Path,
    llm_main: Any,
    capsys: pytest.CaptureFixture,
) -> None:
    """An empty data.path is the working folder (every .txt/.md under it was read); an interval
    of 0 divided by zero in Lightning; a NaN LoRA alpha was blamed on the learning rate."""
    err = _fails(llm_main, capsys, verb, *_verb_args(verb, tmp_path), *overrides)
    assert named in err.splitlines()[0]
    assert not (tmp_path / "data" / "cache").exists()  # refused before any tokenizing


# -- memory: refused with the figures before allocating ---------------------------------------


@pytest.mark.parametrize(
    ("override", "advice"),
    [
        ("data.batch_size=100000000", "lower data.batch_size (or model.block_size"),
        ("model.n_embd=1000000", "lower model.n_embd or model.n_layer"),
    ],
)
def test_a_run_that_cannot_fit_in_memory_is_refused(
    override: str, advice: str, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    err = _fails(llm_main, capsys, "train", *_verb_args("train", tmp_path), override)
    first = err.splitlines()[0]
    assert first.startswith("Error: this run needs at least ") and " GiB of memory (" in first
    assert "but the CPU has " in first and " GiB available: " in first and advice in first


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "llama", "vocab_size": 320, "max_position_embeddings": 64,
         "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 10**6,
         "intermediate_size": 64, "tie_word_embeddings": True},
        {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_layer": 2,
         "n_head": 2, "n_embd": 10**6},
    ],
)  # fmt: skip
def test_a_hugging_face_config_too_large_for_memory_is_refused(
    config: dict[str, Any], tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """A config.json that says hidden_size 10**6: named before its weights are read."""
    folder = tmp_path / "crafted"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    named = f"Error: the model of {folder / 'config.json'} needs at least "
    corpus = write_corpus(tmp_path)
    err = _fails(llm_main, capsys, "finetune", *_finetune(tmp_path, "text", corpus),
                 f"init={folder}")  # fmt: skip
    assert err.startswith(named) and f"check the sizes in {folder / 'config.json'}" in err
    err = _fails(llm_main, capsys, "evaluate", f"init={folder}", "data=text_files",
                 f"data.path={corpus}")  # fmt: skip
    assert err.startswith(named)


# -- classify -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "row"),
    [
        ("text,label\nwin cash,spam\nsee you,\nhi,ham\n", "sms.csv:3"),
    ],
)
def test_an_empty_label_is_named_by_file_and_row(
    content: str, row: str, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """Not a third class named ''."""
    path = tmp_path / "sms.csv"
    path.write_text(content, encoding="utf-8")
    err = _fails(llm_main, capsys, "finetune", *_finetune(tmp_path, "classify", path))
    assert err.splitlines()[0] == (
        f"Error: {tmp_path / row}: the label (column 'label') is empty; give that row its "
        "label, or delete the row"
    )


@pytest.mark.parametrize(
    ("args", "stdin", "where"),
    [
        (["text_file=-"], "", "text_file=- (standard input)"),
        (["text_file=-"], " \n\t\n", "text_file=- (standard input)"),
        (["text_file=FILE"], None, "text_file=FILE"),
        (["text= "], None, "text="),
    ],
)
def test_classify_refuses_an_empty_text(
    args: list[str],
    stdin: str | None,
    where: str,
    classifier_ckpt: Path,
    tmp_path: Path,
    llm_main: Any,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Empty input printed a label and a probability (`ham 0.5678`)."""
    import io
    import sys

    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    args = [a.replace("FILE", str(empty)) for a in args]
    err = _fails(llm_main, capsys, "classify", f"ckpt_path={classifier_ckpt}", *args)
    assert err.splitlines()[0] == (
        f"Error: {where.replace('FILE', str(empty))} is empty (or only whitespace): there is no "
        "text to classify; give one, e.g. 'text=Claim your free prize now!' or "
        "text_file=message.txt"
    )


# -- verbs whose tokenizer is the checkpoint's ------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "override"),
    [
        ("evaluate", "tokenizer=gpt2"),
        ("generate", "tokenizer=gpt2"),
        ("chat", "tokenizer=gpt2"),
        ("classify", "tokenizer=gpt2"),
        ("generate", "+tokenizer=gpt2"),
        ("evaluate", "tokenizer.name=x"),
    ],
)
def test_a_tokenizer_override_says_the_checkpoint_brings_its_own(
    verb: str, override: str, classifier_ckpt: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """Not Hydra's "use +tokenizer=gpt2" (which would add a group nothing reads)."""
    text = ["text=hi"] if verb == "classify" else []
    err = _fails(llm_main, capsys, verb, f"ckpt_path={classifier_ckpt}", *text, override)
    key = override.lstrip("+").split("=")[0]
    source = "ckpt_path=, or the init= folder" if verb == "evaluate" else "ckpt_path="
    assert err.splitlines()[0] == (
        f"Error: llm {verb} has no {key} setting: the tokenizer comes from the checkpoint "
        f"({source}), so text is read the way the model was trained; drop {override}"
    )


# -- one run per run folder ---------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["train", "finetune"])
def test_a_run_folder_another_process_uses_is_refused(
    verb: str, tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """Two runs with one hydra.run.dir mixed their checkpoints and logs: the lock is held here
    as another `llm train` would hold it, so the refusal is certain (no race, no sleep)."""
    from filelock import FileLock

    run = tmp_path / "run"
    run.mkdir()
    with FileLock(run / "run.lock"):
        err = _fails(llm_main, capsys, verb, *_verb_args(verb, tmp_path), f"hydra.run.dir={run}")
    assert err.splitlines()[0] == (
        f"Error: another process is using the run folder {run} (it holds {run / 'run.lock'}); "
        "two runs in one folder would mix their checkpoints and logs. Wait for it to end, or run "
        "elsewhere: without hydra.run.dir= each run gets a new dated folder, or set "
        "hydra.run.dir=<another folder>"
    )
    assert not (run / "checkpoints").exists() and not (tmp_path / "data" / "cache").exists()
    assert (run / "run.lock").is_file()  # the other run's folder is left as it was
    logs = "".join(p.read_text() for p in run.glob("*.log"))
    assert "Traceback" not in logs  # nothing of this refusal in the other run's log


def test_only_the_launching_process_locks_and_the_lock_ends_with_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's ddp re-runs the command per rank (LOCAL_RANK set): those share the folder
    their launcher holds. A run that ended leaves the folder free (a resume takes it again)."""
    from filelock import FileLock, Timeout
    from omegaconf import OmegaConf

    from llm.ranks import RANK_VARIABLES
    from llm.training.trainer import RunFolderBusy, run_folder_lock

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "run")})
    with run_folder_lock(cfg):
        monkeypatch.setenv("LOCAL_RANK", "1")
        with run_folder_lock(cfg):  # rank 1 of the same run
            pass
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(RunFolderBusy), run_folder_lock(cfg):
            pass
        with pytest.raises(Timeout):
            FileLock(tmp_path / "run" / "run.lock").acquire(timeout=0)
    with run_folder_lock(cfg):  # the first run ended: free again
        pass
