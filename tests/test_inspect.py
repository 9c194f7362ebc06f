"""``llm inspect``: each view's values (the lens's last point is the model's output, unablated
loss is llm evaluate's, patching's end points are the clean and corrupt runs), its shapes, for
every architecture option and Hugging Face weights, and the command line that writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import char_checkpoint, compose, hf_gpt2_dir, write_corpus

from llm import inspection
from llm.inspection.ablation import prompt_batches
from llm.model import GPT, GPTConfig

MODERN = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_weights=False)
ARCHS = {
    "gpt2": {},
    "rope": dict(pos_encoding="rope"),
    "gqa": dict(n_kv_head=2),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "softcap": dict(logit_softcap=3.0),
    "llama": dict(MODERN, n_kv_head=2),
    "qwen3": dict(MODERN, n_kv_head=2, qk_norm=True, head_dim=12, sliding_window=6),
}
PROMPT = "Mary and John left, John gave"
CORRUPT = "Mary and John left, Mary gave"


def model(tokenizer: Any, **kw: Any) -> GPT:
    """A random 2-layer, 4-head model with peaky weights, so every path changes the output."""
    torch.manual_seed(0)
    base: dict = dict(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_head=4)
    m = GPT(GPTConfig(**{**base, "n_embd": 32, **kw})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.05))
    return m


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_lens_last_point_is_the_models_own_output(arch: str, char_tokenizer: Any) -> None:
    m = model(char_tokenizer, **ARCHS[arch])
    ids = inspection.encode(m, char_tokenizer, PROMPT)
    idx = torch.tensor([ids])
    stream = m.residual_stream(idx)
    assert len(stream) == 3 and all(x.shape == (1, len(ids), 32) for x in stream)
    logits = m(idx)[0]
    torch.testing.assert_close(m.unembed(stream[-1]), logits, rtol=0, atol=0)
    lens = inspection.logit_lens(m, char_tokenizer, ids, k=3)
    probs = torch.softmax(logits[0].float(), -1)
    top = probs.topk(3)
    assert lens["points"] == ["embeddings", "block 0", "block 1"]
    assert [len(lens["top"]), len(lens["top"][0]), len(lens["top"][0][0])] == [3, len(ids), 3]
    assert [[c["id"] for c in cell] for cell in lens["top"][-1]] == top.indices.tolist()
    assert [[c["prob"] for c in cell] for cell in lens["top"][-1]] == top.values.tolist()
    came = probs[:-1].gather(1, idx[0, 1:, None]).squeeze(1)
    assert lens["next"][-1] == came.tolist() and len(lens["next"]) == 3
    assert lens["top"][0] != lens["top"][-1]  # earlier points read differently


def test_next_token_lists_the_top_k_and_what_came(char_tokenizer: Any) -> None:
    m = model(char_tokenizer)
    ids = inspection.encode(m, char_tokenizer, PROMPT)
    view = inspection.next_token(m, char_tokenizer, ids, k=4)
    probs = torch.softmax(m(torch.tensor([ids]))[0][0], -1)
    assert view["tokens"] == list(PROMPT) and len(view["positions"]) == len(ids)
    for t, pos in enumerate(view["positions"]):
        assert [c["prob"] for c in pos["top"]] == probs[t].topk(4).values.tolist()
        if t + 1 < len(ids):
            came = pos["next"]
            assert came["id"] == ids[t + 1] and came["prob"] == probs[t, ids[t + 1]].item()
            assert came["rank"] == int((probs[t] > probs[t, ids[t + 1]]).sum()) + 1
    assert "next" not in view["positions"][-1]  # nothing came after the prompt
    json.dumps(view)  # plain data


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_attention_has_every_head_causal_rows_summing_to_one(
    arch: str, char_tokenizer: Any
) -> None:
    m = model(char_tokenizer, **ARCHS[arch])
    ids = inspection.encode(m, char_tokenizer, PROMPT)
    maps = torch.tensor(inspection.attention(m, char_tokenizer, ids)["maps"])
    T = len(ids)
    assert maps.shape == (2, 4, T, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, T))
    assert (maps.triu(1) == 0).all()
    if arch == "qwen3":  # a window of 6: nothing older than 5 tokens back
        assert (maps.tril(-6) == 0).all()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_ablation_base_is_the_models_loss_and_each_head_counts(
    arch: str, char_tokenizer: Any
) -> None:
    m = model(char_tokenizer, **ARCHS[arch])
    ids = inspection.encode(m, char_tokenizer, PROMPT)
    idx = torch.tensor([ids])
    view = inspection.head_ablation(m, prompt_batches(ids))
    assert view["base"] == m(idx[:, :-1], idx[:, 1:])[1].item()  # evaluate's loss of a batch
    assert view["tokens_scored"] == len(ids) - 1
    assert len(view["heads"]) == 2 and all(len(row) == 4 for row in view["heads"])
    assert all(loss != view["base"] for row in view["heads"] for loss in row)
    rise = [[loss - view["base"] for loss in row] for row in view["heads"]]
    assert view["increase"] == rise
    assert len(view["layers"]) == len(view["blocks"]) == 2
    # a removed block: the stream skips it
    skipped = inspection.masked_loss(m, prompt_batches(ids), edit=lambda i, x: x)[0]
    assert skipped == view["base"]


def test_unablated_loss_on_the_val_split_is_llm_evaluates(tmp_path: Path) -> None:
    from llm.checkpoint import load_language_model
    from llm.cli import evaluate as evaluate_cli
    from llm.cli import inspect as inspect_cli

    ckpt = char_checkpoint(tmp_path / "model.ckpt", block_size=32)
    corpus = write_corpus(tmp_path)
    data = ["data=text_files", f"data.path={corpus}", f"paths.data_dir={tmp_path / 'data'}"]
    data += ["limit_batches=2", "data.batch_size=4"]
    expected = evaluate_cli.loss(compose("evaluate", [*data, f"ckpt_path={ckpt}"]), "ckpt_path",
                                 str(ckpt))["val_loss"]  # fmt: skip
    cfg = compose("inspect", [*data, f"ckpt_path={ckpt}", "prompt=x", "split=val"])
    lm = load_language_model(ckpt)
    view = inspect_cli.run_views(cfg, lm, [1, 2], ["ablation"])["ablation"]
    assert view["split"] == "val" and view["tokens_scored"] == 2 * 4 * 32
    assert view["base"] == expected


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_patching_ends_are_the_clean_and_corrupt_runs(arch: str, char_tokenizer: Any) -> None:
    m = model(char_tokenizer, **ARCHS[arch])
    clean = inspection.encode(m, char_tokenizer, PROMPT)
    corrupt = inspection.encode(m, char_tokenizer, CORRUPT, key="corrupt")
    a, w = (inspection.single_token(char_tokenizer, c, k) for c, k in (("M", "a"), ("J", "w")))
    c_idx, k_idx = torch.tensor([clean]), torch.tensor([corrupt])
    stream = m.residual_stream(c_idx)
    logits = m(c_idx)[0][0, -1]
    clean_diff = inspection.logit_diff(m, c_idx, a, w)
    assert clean_diff == pytest.approx((logits[a] - logits[w]).item(), abs=1e-5)
    corrupt_diff = inspection.logit_diff(m, k_idx, a, w)
    T, last = len(clean), m.config.n_layer
    every = list(range(T))
    assert inspection.logit_diff(m, k_idx, a, w, (stream, last, every)) == clean_diff
    assert inspection.logit_diff(m, k_idx, a, w, (stream, 1, [])) == corrupt_diff
    view = inspection.activation_patching(m, char_tokenizer, clean, corrupt, a, w)
    assert (view["clean_diff"], view["corrupt_diff"]) == (clean_diff, corrupt_diff)
    effect = view["effect"]
    assert len(effect) == last + 1 and all(len(row) == T for row in effect)
    assert effect[last] == [0.0] * (T - 1) + [1.0]  # after the last block only the end counts
    changed = [t for t in range(T) if clean[t] != corrupt[t]]
    assert changed == [20, 21, 22, 23]  # "John" -> "Mary"
    assert all(effect[0][t] == 0.0 for t in every if t not in changed)  # same token, no change
    # the embeddings of the tokens that differ: the clean run itself
    assert inspection.logit_diff(m, k_idx, a, w, (stream, 0, changed)) == clean_diff
    json.dumps(view)


def test_patching_refuses_what_it_cannot_trace(char_tokenizer: Any) -> None:
    m = model(char_tokenizer)
    ids = inspection.encode(m, char_tokenizer, PROMPT)
    with pytest.raises(ValueError, match=r"same number of tokens.*29 and 28"):
        inspection.activation_patching(m, char_tokenizer, ids, ids[:-1], 1, 2)
    with pytest.raises(ValueError, match="no difference to trace"):
        inspection.activation_patching(m, char_tokenizer, ids, ids, 1, 2)
    with pytest.raises(ValueError, match=r"answer='Mary' must be one token, it is 'M' \+ 'a'"):
        inspection.single_token(char_tokenizer, "Mary", "answer")
    with pytest.raises(ValueError, match=r"prompt= is 60 tokens.*block_size 48"):
        inspection.encode(m, char_tokenizer, "a" * 60)


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_cli_writes_figures_json_and_tensorboard(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    ckpt = char_checkpoint(run / "checkpoints" / "last.ckpt", block_size=48)
    args = [f"ckpt_path={ckpt}", f"prompt={PROMPT}", f"corrupt={CORRUPT}", "answer=M", "wrong=J"]
    assert llm_main("inspect", *args) == 0
    out = capsys.readouterr().out
    for heading in ("next token:", "logit lens:", "attention: 2 layers x 2 heads", "ablation on",
                    "activation patching:", "wrote:"):  # fmt: skip
        assert heading in out
    folder = run / "inspect"
    names = ["lens", "attention_layer0", "attention_layer1", "ablation", "patching"]
    assert all(_png(folder / f"{n}.png") for n in names)
    saved = json.loads((folder / "inspect.json").read_text())
    assert set(saved) == {"ckpt_path", "prompt", "next_token", "lens", "attention", "ablation",
                          "patching"}  # fmt: skip
    assert saved["prompt"] == PROMPT and len(saved["lens"]["top"]) == 3
    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"inspect/{n}" for n in names)
    # json=true: the same JSON on stdout, nothing else; views= picks some
    assert llm_main("inspect", *args, "json=true", "views=[lens,patching]", "tensorboard=false",
                    f"out_dir={tmp_path / 'two'}") == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"ckpt_path", "prompt", "lens", "patching"}
    assert printed["lens"] == saved["lens"] and printed["patching"] == saved["patching"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "inspect.json", "lens.png", "patching.png"]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("views=[patching]",), "views=patching needs corrupt=, answer=, wrong="),
        (("views=[lense]",), "views=['lense']: choose all or a list of next_token, lens"),
        (("split=train",), "split=train: choose prompt or val"),
        (("corrupt=abc", "answer=M", "wrong=J"), "the same number of tokens to patch"),
        (("top_k=0",), "top_k"),
    ],
)
def test_inspect_cli_errors_name_the_key(
    args: tuple[str, ...], message: str, tmp_path: Path, llm_main: Any,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    ckpt = char_checkpoint(tmp_path / "m.ckpt", block_size=48)
    assert llm_main("inspect", f"ckpt_path={ckpt}", "prompt=Mary", *args) == 1
    assert message in capsys.readouterr().err


def test_ioi_example_on_a_random_gpt2(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """docs/inspect.md's indirect-object example, run as documented for init=gpt2 (its weights
    cannot be had offline: a random GPT-2 of the same vocabulary and layout)."""
    folder = hf_gpt2_dir(tmp_path / "gpt2")
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    assert llm_main(
        "inspect", f"init={folder}", f"prompt={clean}", f"corrupt={corrupt}", "answer= Mary",
        "wrong= John", "views=[patching]", "json=true", "out_dir=" + str(tmp_path / "ioi"),
    ) == 0  # fmt: skip
    view = json.loads(capsys.readouterr().out)["patching"]
    assert view["tokens"][:3] == ["When", " Mary", " and"] and len(view["tokens"]) == 14
    assert (view["answer"], view["wrong"]) == (" Mary", " John")
    assert len(view["effect"]) == 3 and view["effect"][2][-1] == 1.0
    assert (view["tokens"][9], view["corrupt_tokens"][9]) == (" John", " Mary")
    assert all(v == 0.0 for t, v in enumerate(view["effect"][0]) if t != 9)  # the same token
    assert math.isfinite(view["clean_diff"]) and view["clean_diff"] != view["corrupt_diff"]


@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_llama_and_qwen3_weights_are_inspected_alike(case: str, tmp_path: Path) -> None:
    """Hugging Face Llama and Qwen3 weights (tiny, random) through init=: every view."""
    transformers = pytest.importorskip("transformers")
    from _hf_utils import train_tokenizer
    from test_hf_llama_qwen import CASES, SHAPE

    from llm.initial_weights import init_language_model

    folder = train_tokenizer(tmp_path / case)
    cls_name, extra = CASES[case]
    cls = getattr(transformers, cls_name)
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    torch.manual_seed(0)
    cls(cls.config_class(**{**SHAPE, **extra, "vocab_size": vocab})).save_pretrained(folder)
    lm = init_language_model(folder)
    m, tok = lm.model, lm.tokenizer
    ids = inspection.encode(m, tok, "the quick brown fox jumps over the lazy dog")
    idx = torch.tensor([ids])
    lens = inspection.logit_lens(m, tok, ids)
    assert [c[0]["id"] for c in lens["top"][-1]] == m(idx)[0][0].argmax(-1).tolist()
    maps = torch.tensor(inspection.attention(m, tok, ids)["maps"])
    assert maps.shape == (3, 6, len(ids), len(ids))
    view = inspection.head_ablation(m, prompt_batches(ids))
    assert view["base"] == m(idx[:, :-1], idx[:, 1:])[1].item()
    assert len(view["heads"]) == 3 and len(view["heads"][0]) == 6
