"""lm-evaluation-harness on our models: the adapter's numbers against direct forward passes,
and `llm evaluate harness.tasks=[...]` end to end on local tasks this file writes (offline).

Skipped without the `eval` extra (`pip install -e ".[eval]"`); tests/test_generate_evaluate.py
checks the message a user without it gets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_gpt2_dir, write_jsonl

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from llm.evaluation.harness import HarnessLM

MC_ROWS = [
    {"ctx": "First Citizen: Before we", "endings": ["proceed", "xqzv", "speak"], "label": 0},
    {"ctx": "hear me", "endings": ["speak.", "zzzz.", "walk."], "label": 0},
    {"ctx": "All: Speak,", "endings": ["speak.", "qq.", "First"], "label": 0},
    {"ctx": "You are all resolved", "endings": ["rather", "xx", "to die"], "label": 1},
]
ROLL_ROWS = [
    {"text": "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3},
    {"text": "All:\nSpeak, speak."},
]
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
ROLL_YAML = """task: tiny_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_tasks(folder: Path) -> Path:
    """A local multiple-choice task and a rolling-perplexity task (JSON data + task YAMLs)."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = write_jsonl(folder / "mc.jsonl", MC_ROWS)
    roll = write_jsonl(folder / "roll.jsonl", ROLL_ROWS)
    (folder / "tiny_mc.yaml").write_text(MC_YAML.format(data=mc))
    (folder / "tiny_roll.yaml").write_text(ROLL_YAML.format(data=roll))
    return folder


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _direct_logprob(model: Any, context: list[int], continuation: list[int]) -> float:
    """The continuation's summed log-softmax from one plain forward pass over the whole text."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1])[0][0].float(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return float(sum(logp[p, t] for p, t in zip(positions, continuation, strict=True)))


def test_loglikelihood_equals_a_direct_forward_pass(tiny_gpt: Any, char_tokenizer: Any) -> None:
    tok = char_tokenizer
    lm = HarnessLM(tiny_gpt, tok, batch_size=2)  # 5 requests: batches of different widths
    pairs = [
        ("Before we", " proceed"),
        ("hear me speak", "."),
        ("A", " much longer continuation"),
        ("All: Speak, speak", "!"),
        ("You are", " all"),
    ]
    results = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (ctx, cont), (logprob, _) in zip(pairs, results, strict=True):
        expected = _direct_logprob(tiny_gpt, tok.encode(ctx), tok.encode(cont))
        assert logprob == pytest.approx(expected, abs=1e-5)
    # is_greedy: true exactly for the continuation greedy decoding produces
    ctx = tok.encode("hear me")
    greedy = tiny_gpt.generate(torch.tensor([ctx]), 4, temperature=0.0)[0, len(ctx) :].tolist()
    other = [(greedy[0] + 1) % tok.vocab_size, *greedy[1:]]
    flags = lm.loglikelihood(
        _requests(
            "loglikelihood", [("hear me", tok.decode(greedy)), ("hear me", tok.decode(other))]
        )
    )
    assert [g for _, g in flags] == [True, False]


def test_a_context_longer_than_the_block_is_cropped_from_the_left(
    tiny_gpt: Any, char_tokenizer: Any
) -> None:
    tok, block = char_tokenizer, tiny_gpt.config.block_size  # 32
    ctx = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak."
    cont = " You are"
    assert len(ctx) > 2 * block
    lm = HarnessLM(tiny_gpt, tok)
    [(logprob, _)] = lm.loglikelihood(_requests("loglikelihood", [(ctx, cont)]))
    ids = tok.encode(ctx + cont)[-(block + 1) :]  # what fits: block inputs, last block targets
    kept = ids[: len(ids) - len(cont)]
    assert logprob == pytest.approx(_direct_logprob(tiny_gpt, kept, tok.encode(cont)), abs=1e-5)
    # the dropped (oldest) context changes nothing
    [(same, _)] = lm.loglikelihood(_requests("loglikelihood", [("xyz" + ctx, cont)]))
    assert same == pytest.approx(logprob, abs=1e-6)


@pytest.mark.parametrize("extra", [0, 5])
def test_loglikelihood_rolling_is_the_sliding_window_sum(
    tiny_gpt: Any, char_tokenizer: Any, extra: int
) -> None:
    """A text 3 blocks long (and 3 blocks + 5): every token predicted once, in windows of the
    block size; the first window starts from end-of-text, the last reads a full block."""
    tok, block = char_tokenizer, tiny_gpt.config.block_size
    text = ("To be, or not to be, that is the question. " * 4)[: 3 * block + extra]
    ids = tok.encode(text)
    assert len(ids) == 3 * block + extra
    padded = [tok.eot_id, *ids]
    expected = 0.0
    for start in range(0, 3 * block, block):  # windows of `block` inputs, `block` targets
        window = padded[start : start + block + 1]
        expected += _direct_logprob(tiny_gpt, window[:1], window[1:])
    if extra:  # the last tokens, read after the full block before them
        tail = ids[-(block + 1) :]
        expected += _direct_logprob(tiny_gpt, tail[: block + 1 - extra], tail[block + 1 - extra :])
    [total] = HarnessLM(tiny_gpt, tok, batch_size=2).loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(text,)])
    )
    assert total == pytest.approx(expected, abs=1e-4)


def test_generate_until_is_greedy_and_stops_at_a_stop_string(
    tiny_gpt: Any, char_tokenizer: Any
) -> None:
    tok = char_tokenizer
    ctx = "Before we proceed"
    ids = tok.encode(ctx)
    greedy = tok.decode(tiny_gpt.generate(torch.tensor([ids]), 12, temperature=0.0)[0, len(ids) :])
    stop = greedy[5]
    cut = greedy[: greedy.index(stop)]
    lm = HarnessLM(tiny_gpt, tok)
    out = lm.generate_until(
        _requests(
            "generate_until",
            [(ctx, {"until": ["\x00never"], "max_gen_toks": 12}), (ctx, {"until": [stop]})],
        )
    )
    assert out == [greedy, cut]


@pytest.mark.slow
def test_llm_evaluate_runs_local_tasks(
    trained: dict[str, Any], tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """The table, the JSON in the run folder, and numbers that agree with our own scoring."""
    from llm.checkpoint import load_language_model
    from llm.evaluation.multiple_choice import evaluate_multiple_choice, read_examples

    tasks = write_tasks(tmp_path / "tasks")
    code = llm_main(
        "evaluate",
        f"ckpt_path={trained['ckpt']}",
        "harness.tasks=[tiny_mc,tiny_roll]",
        f"harness.include_path={tasks}",
        "harness.limit=3",
        "harness.bootstrap_iters=100",
        "harness.batch_size=4",
        "device=cpu",
    )
    out = capsys.readouterr().out
    assert code == 0
    for cell in ("|tiny_mc", "|acc ", "|acc_norm", "|tiny_roll", "|word_perplexity", "|bits_per"):
        assert cell in out
    [path] = (trained["ckpt"].parent.parent / "eval").glob("harness-tiny_mc+tiny_roll-*.json")
    assert f"results: {path}" in out
    saved = json.loads(path.read_text())
    assert saved["llm"]["ckpt_path"] == str(trained["ckpt"]) and saved["llm"]["limit"] == 3
    mc, roll = saved["results"]["tiny_mc"], saved["results"]["tiny_roll"]
    assert saved["n-samples"]["tiny_mc"]["effective"] == 3

    # lm-eval's acc (the highest summed log-probability of " " + ending) is our benchmark's acc
    lm = load_language_model(trained["ckpt"])
    ours = evaluate_multiple_choice(lm.model, lm.tokenizer, read_examples(tasks / "mc.jsonl", 3))
    assert mc["acc,none"] == pytest.approx(ours["acc"])
    assert f"{mc['acc,none']:.4f}" in out
    # bits per byte is the rolling log-likelihood over the UTF-8 bytes
    harness_lm = HarnessLM(lm.model, lm.tokenizer)
    texts = [r["text"] for r in ROLL_ROWS]
    total = sum(harness_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert roll["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)


@pytest.mark.slow
def test_llm_evaluate_on_a_hugging_face_folder(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """init=<folder>: GPT-2 weights through our model, tiktoken's gpt2 encoding, JSON in the
    folder's eval/."""
    from llm.evaluation.multiple_choice import evaluate_multiple_choice, read_examples
    from llm.model import GPT
    from llm.tokenizers import TiktokenTokenizer

    folder = hf_gpt2_dir(tmp_path / "gpt2")
    tasks = write_tasks(tmp_path / "tasks")
    args = ("harness.tasks=[tiny_mc]", f"harness.include_path={tasks}", "device=cpu")
    assert llm_main("evaluate", f"init={folder}", *args) == 0
    assert "|tiny_mc" in capsys.readouterr().out
    [path] = (folder / "eval").glob("harness-tiny_mc-*.json")
    acc = json.loads(path.read_text())["results"]["tiny_mc"]["acc,none"]
    model = GPT.from_pretrained(folder).eval()
    ours = evaluate_multiple_choice(
        model, TiktokenTokenizer("gpt2"), read_examples(tasks / "mc.jsonl")
    )
    assert acc == pytest.approx(ours["acc"])

    assert llm_main("evaluate", f"init={folder}", "ckpt_path=x.ckpt", *args) == 1
    assert "exactly one of ckpt_path" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unknown_task_is_named(
    trained: dict[str, Any], tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """Slow: telling a task is unknown means indexing lm-eval's thousands of built-in ones."""
    tasks = write_tasks(tmp_path / "tasks")
    code = llm_main(
        "evaluate",
        f"ckpt_path={trained['ckpt']}",
        "harness.tasks=[tiny_mc,no_such_task]",
        f"harness.include_path={tasks}",
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "no task named ['no_such_task']" in err and "harness.include_path" in err
