"""Sampling and evaluation of a trained checkpoint: functions, CLIs and loading errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch


def _datamodule(module: Any, trained: dict[str, Any], **kw: Any) -> Any:
    from llm.data import TextDataModule, TextFiles
    from llm.tokenizers import tokenizer_from_dict

    return TextDataModule(
        corpus=TextFiles,
        path=trained["corpus"],
        tokenizer=tokenizer_from_dict(module.hparams["tokenizer"]),
        block_size=module.config.block_size,
        batch_size=8,
        cache_dir=trained["data_dir"] / "cache",
        **kw,
    )


def test_generate_text_is_seeded_and_prompt_prefixed(trained: dict[str, Any]) -> None:
    from llm.checkpoint import load_checkpoint
    from llm.inference import generate_text

    module = load_checkpoint(trained["ckpt"])
    a = generate_text(
        module.model, module.tokenizer, "First", 20, temperature=0.8, top_k=10, top_p=None, seed=7
    )
    b = generate_text(
        module.model, module.tokenizer, "First", 20, temperature=0.8, top_k=10, top_p=None, seed=7
    )
    assert a == b and a.startswith("First")
    assert len(module.tokenizer.encode(a)) == len(module.tokenizer.encode("First")) + 20
    greedy = generate_text(
        module.model,
        module.tokenizer,
        "First",
        20,
        temperature=0.0,
        top_k=None,
        top_p=None,
        seed=None,
    )
    assert greedy.startswith("First")


@pytest.mark.slow
def test_generate_cli_prints_prompt_and_continuation(
    trained: dict[str, Any], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    args = (f"ckpt_path={trained['ckpt']}", "prompt=Before", "max_new_tokens=20", "seed=3")
    assert llm_main("generate", *args) == 0
    out = capsys.readouterr().out
    assert out.startswith("Before") and len(out.rstrip("\n")) > len("Before")
    assert llm_main("generate", *args) == 0
    assert capsys.readouterr().out == out  # seeded: the same sample


def test_evaluate_metrics_are_consistent(trained: dict[str, Any]) -> None:
    from llm.checkpoint import load_checkpoint
    from llm.evaluation.loss import evaluate

    module = load_checkpoint(trained["ckpt"])
    metrics = evaluate(module, _datamodule(module, trained), limit_batches=3)
    loss = metrics["val_loss"]
    assert math.isfinite(loss) and loss > 0
    assert metrics["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["bpc"] == pytest.approx(loss / math.log(2), rel=1e-5)


def test_evaluate_rejects_a_different_tokenizer(trained: dict[str, Any]) -> None:
    from llm.checkpoint import load_checkpoint
    from llm.evaluation.loss import evaluate

    module = load_checkpoint(trained["ckpt"])
    dm = _datamodule(module, trained)  # data tokenized with the trained vocabulary
    tok = dict(module.hparams["tokenizer"])
    tok["chars"] = list(reversed(tok["chars"]))  # same alphabet, other ids: a different model
    module.hparams["tokenizer"] = tok
    with pytest.raises(ValueError, match="checkpoint's tokenizer differs from the data's"):
        evaluate(module, dm, limit_batches=1)


def test_evaluate_cli_prints_metrics(
    trained: dict[str, Any], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    code = llm_main(
        "evaluate",
        f"ckpt_path={trained['ckpt']}",
        "data=text_files",
        f"data.path={trained['corpus']}",
        f"paths.data_dir={trained['data_dir']}",
        "limit_batches=3",
    )
    out = capsys.readouterr().out
    assert code == 0
    for key in ("val_loss:", "perplexity:", "bits_per_char:"):
        assert key in out
    lines = dict(line.split(": ") for line in out.strip().splitlines())
    # which checkpoint, which split, how many tokens were scored
    assert lines["checkpoint"] == str(trained["ckpt"])
    assert lines["split"].startswith(f"validation, the last 10% of {trained['corpus']} ")
    from helpers import compose

    batch = compose("evaluate", ["data=text_files"]).data.batch_size
    assert lines["tokens"].endswith(f"(the first 3 batches of {batch} windows, limit_batches=3)")
    loss = float(lines["val_loss"])
    assert float(lines["bits_per_char"]) == pytest.approx(loss / math.log(2), abs=2e-4)


def test_missing_checkpoint_says_where_runs_write(tmp_path: Path) -> None:
    from llm.checkpoint import load_checkpoint

    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=r"checkpoints/last\.ckpt") as err:
        load_checkpoint(missing)
    assert str(missing) in str(err.value)


def test_corrupt_and_foreign_checkpoints_are_named(tmp_path: Path) -> None:
    import torch

    from llm.checkpoint import load_checkpoint

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage, not a zip\xff" * 10)
    with pytest.raises(ValueError, match="is not a checkpoint") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, foreign)
    with pytest.raises(ValueError, match=r"not a llm checkpoint"):
        load_checkpoint(foreign)


@pytest.mark.parametrize(
    ("verb", "arg", "message"),
    [
        ("generate", "max_new_tokens=-1", "max_new_tokens=-1: must be an integer >= 0"),
        ("generate", "num_samples=0", "num_samples=0: must be an integer >= 1"),
        ("evaluate", "limit_batches=0", "limit_batches=0: must be an integer >= 1 or null"),
    ],
)
def test_cli_refuses_counts_that_would_do_nothing(
    verb: str, arg: str, message: str, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    assert llm_main(verb, "ckpt_path=unused.ckpt", arg) == 1
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_a_clear_error() -> None:
    from llm.cli.app import resolve_device

    with pytest.raises(ValueError, match="no CUDA GPU; use cpu or auto"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_language_model_loader_matches_the_lightning_module(trained: dict[str, Any]) -> None:
    """`llm generate` loads the GPT and tokenizer without Lightning: same weights, same logits."""
    from llm.checkpoint import (
        CheckpointError,
        load_checkpoint,
        load_language_model,
        save_checkpoint,
    )

    module = load_checkpoint(trained["ckpt"])
    lm = load_language_model(trained["ckpt"])
    assert lm.tokenizer.to_dict() == module.tokenizer.to_dict()
    assert not lm.model.training
    x = torch.randint(0, lm.model.config.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x)[0], module.model(x)[0], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*missing\.ckpt: no such file"):
        load_language_model(trained["ckpt"].with_name("missing.ckpt"))
    # LoRA adapters are applied, unmerged, as the LightningModule does
    lora = {"r": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["attn.c_attn"]}
    adapted = type(module)(**{**module.hparams, "lora": lora})
    path = save_checkpoint(adapted, trained["ckpt"].parent / "lora-test.ckpt")
    assert load_language_model(path).hparams["lora"] == lora
    torch.testing.assert_close(
        load_language_model(path).model(x)[0], adapted.eval().model(x)[0], rtol=0, atol=0
    )
    with pytest.raises(CheckpointError, match="is a classifier checkpoint"):
        classifier = trained["ckpt"].parent / "classifier-test.ckpt"
        raw = torch.load(trained["ckpt"], weights_only=True)
        torch.save({**raw, "kind": "classifier"}, classifier)
        load_language_model(classifier)


# -- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.8, "top_k": 10, "top_p": None, "seed": 7},
        {"temperature": 1.0, "top_k": None, "top_p": 0.9, "seed": 3},
        {"temperature": 0.0, "top_k": None, "top_p": None, "seed": None},
    ],
)
def test_streamed_text_equals_generate_text(trained: dict[str, Any], settings: dict) -> None:
    from llm.checkpoint import load_language_model
    from llm.inference import generate_text, stream_text

    lm = load_language_model(trained["ckpt"])
    whole = generate_text(lm.model, lm.tokenizer, "First", 40, **settings)
    stream = stream_text(lm.model, lm.tokenizer, "First", 40, **settings)
    pieces = list(stream)
    assert "First" + "".join(pieces) == whole
    assert stream.count == 40 and len(pieces) == 40  # one piece per char token
    assert stream.rate().startswith("40 tokens in ")


def test_incremental_decoder_never_prints_a_partial_character() -> None:
    """Byte-level BPE splits an emoji or a CJK character over several tokens: the decoder holds
    them back until the character is whole (no U+FFFD ever printed)."""
    from llm.inference import IncrementalDecoder
    from llm.tokenizers import TiktokenTokenizer

    tok = TiktokenTokenizer("gpt2")
    text = "Hi 🙂 你好, café 😀😀! ü"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces and "你" in pieces  # held back, then printed whole
    # after a prompt (context), the first piece is decoded as the rest would be
    after = IncrementalDecoder(tok, context=tok.encode("Say"))
    assert after.push(tok.encode(" 你好")) + after.flush() == " 你好"


def test_generate_cli_streams_and_reports_tokens_per_second(
    trained: dict[str, Any], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    from llm.checkpoint import load_language_model
    from llm.inference import generate_text

    lm = load_language_model(trained["ckpt"])
    expected = generate_text(lm.model, lm.tokenizer, "Before", 25, top_k=200, seed=3)
    args = (f"ckpt_path={trained['ckpt']}", "prompt=Before", "max_new_tokens=25", "seed=3")
    assert llm_main("generate", *args) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "25 tokens in " in captured.err and "tokens/s)" in captured.err


def test_generate_cli_ctrl_c_keeps_what_came_and_exits_130(
    trained: dict[str, Any],
    llm_main: Any,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import llm.inference
    from llm.checkpoint import load_language_model

    tok = load_language_model(trained["ckpt"]).tokenizer
    ids = [tok.encode(c)[0] for c in "abc"]

    def interrupted(*args: Any, **kwargs: Any) -> Any:  # three tokens, then Ctrl-C
        for i in ids:
            yield torch.tensor([[i]])
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.inference, "generate_stream", interrupted)
    code = llm_main("generate", f"ckpt_path={trained['ckpt']}", "prompt=Go ", "max_new_tokens=999")
    captured = capsys.readouterr()
    assert code == 130
    assert captured.out == "Go abc\n"  # what was sampled stays printed
    assert "3 tokens in " in captured.err
    assert "Interrupted: stopped after 3 tokens." in captured.err


@pytest.mark.slow
def test_sigint_stops_a_huge_generation_cleanly(trained: dict[str, Any]) -> None:
    """A real Ctrl-C (SIGINT) on a 10-million-token request: output so far, then exit 130."""
    import os
    import re
    import signal

    from helpers import start_cli

    proc = start_cli(
        "generate", f"ckpt_path={trained['ckpt']}", "prompt=Go", "max_new_tokens=10000000",
        "device=cpu",
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = b""  # streamed: the prompt, then sampled text, so it is sampling now
        while len(first) < 10 and (chunk := os.read(proc.stdout.fileno(), 10 - len(first))):
            first += chunk
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)  # reads on from the same pipe: nothing lost
    finally:
        if proc.poll() is None:  # a failed wait must not leave it sampling
            proc.kill()
            proc.communicate()
    text, log = (first + out).decode(), err.decode()
    assert text.startswith("Go") and len(text) > 10 and proc.returncode == 130, log
    stopped = re.search(r"Interrupted: stopped after (\d+) tokens\.", log)
    assert stopped and int(stopped[1]) >= 1 and "tokens/s)" in log, log


# -- lm-evaluation-harness ------------------------------------------------------------------


def test_harness_without_the_extra_says_what_to_install(
    trained: dict[str, Any],
    llm_main: Any,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails
    monkeypatch.delitem(sys.modules, "llm.evaluation.harness", raising=False)
    code = llm_main("evaluate", f"ckpt_path={trained['ckpt']}", "harness.tasks=[hellaswag]")
    err = capsys.readouterr().err
    assert code == 1
    assert 'pip install -e ".[eval]"' in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "set exactly one of ckpt_path=<llm checkpoint> and init="),
        (("ckpt_path=a.ckpt", "init=gpt2"), "got ckpt_path=a.ckpt, init=gpt2"),
        (("ckpt_path=a.ckpt", "harness.tasks=[]"), "harness.tasks must name tasks"),
    ],
)
def test_evaluate_needs_one_model_and_named_tasks(
    args: tuple[str, ...], message: str, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    assert llm_main("evaluate", *args) == 1
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_init_scores_hugging_face_weights(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """init=<folder>: GPT-2 weights through our model, read with tiktoken's gpt2 encoding."""
    from helpers import hf_gpt2_dir, write_corpus

    folder = hf_gpt2_dir(tmp_path / "gpt2")
    corpus = write_corpus(tmp_path)
    code = llm_main(
        "evaluate", f"init={folder}", "data=text_files", f"data.path={corpus}",
        f"paths.data_dir={tmp_path / 'data'}", "limit_batches=2", "device=cpu",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    loss = float(out.split("val_loss: ")[1].split()[0])
    assert loss == pytest.approx(math.log(50257), abs=0.5)  # a random GPT-2: near uniform
    assert "bits_per_char" not in out  # BPE tokens are not characters
