"""The `llm` command: its verbs and their help, free text, and the export verb end to end."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_cli
from hypothesis import given
from hypothesis import strategies as st

from llm.cli import VERBS, main, usage


def test_usage_lists_every_verb_on_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out == usage() + "\n"
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert (
        listed
        == list(VERBS)
        == [
            "train",
            "finetune",
            "rl",
            "evaluate",
            "generate",
            "chat",
            "serve",
            "classify",
            "inspect",
            "prepare",
            "tokenize",
            "report",
            "export",
        ]
    )
    assert main([]) == 2  # no verb: the usage, as an error


def test_unknown_verb_names_it_and_lists_the_verbs(capsys: pytest.CaptureFixture) -> None:
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'trian'" in err and "finetune" in err


def _help(verb: str, capsys: pytest.CaptureFixture) -> str:
    assert main([verb, "--help"]) == 0
    return capsys.readouterr().out


def _groups(text: str) -> dict[str, str]:
    block = text.split("config groups", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return {line.split()[0]: line for line in block}


@pytest.mark.slow
def test_verb_help_starts_with_a_description_and_examples(capsys: pytest.CaptureFixture) -> None:
    for name, verb in VERBS.items():
        text = _help(name, capsys)
        first, _, rest = text.partition("\n\n")
        assert first == f"llm {name}: {verb.summary}"
        assert rest.startswith(verb.description)
        examples = [line.strip() for line in text.split("examples:\n", 1)[1].split("\n\n")[0]]
        assert len(verb.examples) >= 2 and all(f"llm {name} " in e for e in verb.examples)
        assert examples  # printed


@pytest.mark.slow
def test_verb_help_lists_only_the_groups_the_verb_uses(capsys: pytest.CaptureFixture) -> None:
    train = _groups(_help("train", capsys))
    assert {"model", "tokenizer", "data", "trainer", "optim", "experiment"} <= set(train)
    assert not {"task", "lora"} & set(train)  # finetune's groups
    assert "[cpu]" in train["model"] and "[shakespeare_char_cpu]" in train["experiment"]
    assert "finetune_spam" not in train["experiment"]

    finetune = _groups(_help("finetune", capsys))
    assert {"task", "lora", "trainer", "optim"} <= set(finetune) and "model" not in finetune
    assert "finetune_spam" in finetune["experiment"]
    assert "shakespeare_char_cpu" not in finetune["experiment"]

    assert "config groups" not in _help("generate", capsys)  # no trainer, no model: keys only
    assert "prompt_file=null" in _help("generate", capsys)
    assert set(_groups(_help("prepare", capsys))) == {"data", "paths", "tokenizer"}
    for line in train.values():  # _base files are inherited, never chosen
        assert "_base" not in line.replace(",", " ").replace("[", " ").split()


@given(st.text(max_size=40))
def test_free_text_reaches_the_app_verbatim(text: str) -> None:
    """Whatever the user types after `prompt=`, Hydra parses and OmegaConf returns unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from llm.cli.app import quote_free_text

    arg = quote_free_text(f"prompt={text}", ["prompt"])
    value = OverridesParser.create().parse_override(arg).value()
    assert OmegaConf.create({"prompt": value}).prompt == text


def test_quoting_leaves_other_keys_and_quoted_values_alone() -> None:
    from llm.cli.app import quote_free_text

    assert quote_free_text("top_k=10", ["prompt"]) == "top_k=10"
    assert quote_free_text("prompt='a, b'", ["prompt"]) == "prompt='a, b'"
    assert quote_free_text("prompt=a, b", ["prompt"]) == 'prompt="a, b"'
    # run folders are named after overrides: a path with `=` is quoted, a sweep over paths not
    run = "ckpt_path=logs/runs/2026-11-29_seed=3,model=tiny/checkpoints/last.ckpt"
    assert quote_free_text(run, []) == 'ckpt_path="' + run.split("=", 1)[1] + '"'
    assert quote_free_text("+data.path=a=b.txt", []) == '+data.path="a=b.txt"'
    assert quote_free_text("init=a.ckpt,b.ckpt", []) == "init=a.ckpt,b.ckpt"
    assert quote_free_text("hydra.run.dir=x=1", []) == 'hydra.run.dir="x=1"'
    assert quote_free_text("optim.lr=interval(a=1)", []) == "optim.lr=interval(a=1)"


def test_a_path_beyond_ascii_is_quoted_for_hydra() -> None:
    """Hydra's grammar refuses `é` in a bare value; a path key's value is quoted for it, but a
    value Hydra reads as something else on purpose (null, a sweep) is left alone."""
    from llm.cli.app import quote_free_text

    assert quote_free_text("ckpt_path=/runs/été/last.ckpt", []) == 'ckpt_path="/runs/été/last.ckpt"'
    assert quote_free_text("ckpt_path=/my runs/last.ckpt", []) == "ckpt_path=/my runs/last.ckpt"
    assert quote_free_text("ckpt_path=null", []) == "ckpt_path=null"
    assert quote_free_text("prompt=été", []) == "prompt=été"  # not a path key


def test_a_printed_resume_command_pastes_back_through_the_shell_and_hydra() -> None:
    """A run folder with a space, letters beyond ASCII and `=` (its overrides): the words the
    shell makes of the hint are what the `llm` command reads as those paths."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from llm.cli.app import quote_free_text
    from llm.training.shutdown import resume_message

    run = "/tmp/my runs/été_seed=3"
    ckpt = f"{run}/checkpoints/last.ckpt"
    hint = resume_message(ckpt, ["model=tiny", f"hydra.run.dir={run}"]).splitlines()[1]
    words = shlex.split(hint.removeprefix("Resume with: "))
    assert words[:2] == ["llm", "train"]
    parser = OverridesParser.create()
    parsed = [parser.parse_override(quote_free_text(w, [])) for w in words[2:]]
    assert {o.key_or_group: o.value() for o in parsed} == {
        "ckpt_path": ckpt,
        "model": "tiny",
        "hydra.run.dir": run,
    }


@pytest.mark.slow
def test_generate_takes_free_text_and_stdin(trained: dict[str, Any]) -> None:
    prompt = 'Hear me, "speak"! ${x} \\'
    proc = run_cli(
        "generate", f"ckpt_path={trained['ckpt']}", f"prompt={prompt}", "max_new_tokens=5"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(prompt)
    piped = run_cli(
        "generate",
        f"ckpt_path={trained['ckpt']}",
        "prompt_file=-",
        "max_new_tokens=5",
        stdin="Before, we",
    )
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert piped.stdout.startswith("Before, we")


def test_summary_next_command_runs_on_a_run_folder_named_after_overrides(
    tmp_path: Path, trained: dict[str, Any], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """The summary prints `llm generate ckpt_path=<run>/...`; run folders hold `=` and `,`."""
    run = tmp_path / "2026-11-29_12-00-00_seed=3,model=tiny" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(trained["ckpt"], run / "last.ckpt")
    args = ("prompt=Be", "max_new_tokens=4", "temperature=0")
    assert llm_main("generate", f"ckpt_path={run / 'last.ckpt'}", *args) == 0
    copied = capsys.readouterr().out
    assert llm_main("generate", f"ckpt_path={trained['ckpt']}", *args) == 0
    assert copied.startswith("Be") and len(copied) > len("Be")
    assert copied == capsys.readouterr().out  # greedy: the same weights, the same text


@pytest.mark.slow
def test_export_merges_lora_and_writes_a_hugging_face_folder(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    from helpers import ALPHABET, TINY

    from llm.checkpoint import load_checkpoint, save_checkpoint
    from llm.model import GPT
    from llm.tokenizers import CharTokenizer
    from llm.training.module import GPTLitModule

    tok = CharTokenizer()
    tok.fit([ALPHABET])
    lora = {"r": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["attn.c_attn"]}
    torch.manual_seed(0)
    module = GPTLitModule(
        model={**TINY, "block_size": 16, "vocab_size": tok.vocab_size},
        tokenizer=tok.to_dict(),
        lora=lora,
    )
    with torch.no_grad():  # trained adapters: B is no longer zero
        for name, p in module.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5)
    ckpt = save_checkpoint(module, tmp_path / "lora.ckpt")
    out, hf = tmp_path / "merged.ckpt", tmp_path / "hf"

    assert llm_main("export", f"ckpt_path={ckpt}", "hf_dir=" + str(hf)) == 1  # merge first
    assert "add out=<merged.ckpt>" in capsys.readouterr().err
    assert llm_main("export", f"ckpt_path={ckpt}", f"out={out}", f"hf_dir={hf}") == 0
    printed = capsys.readouterr().out
    assert f"merged checkpoint: {out}" in printed and f"Hugging Face folder: {hf}" in printed

    merged = load_checkpoint(out, kind="lm")
    assert merged.hparams["lora"] is None
    x = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        want = module.eval()(x)[0]
        torch.testing.assert_close(merged(x)[0], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(GPT.from_pretrained(hf)(x)[0], want, atol=1e-5, rtol=0)
