"""`llm finetune init=<Qwen3 / Llama folder>` end to end: the folder's own tokenizer.json (with its
chat special tokens) is the one the run trains with and the one its checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _hf_utils import train_tokenizer
from helpers import fast_overrides, write_jsonl

from llm.checkpoint import load_checkpoint
from llm.finetuning.instruct import encode_example

CHAT = "<|im_start|>user\nhello there, how are you?<|im_end|>\n<|im_start|>assistant\nthe quick "
CHAT += "brown fox.<|im_end|>\n"
WORDS = ["fox", "dog", "sun", "sky", "red", "cup"]
RECORDS = [{"instruction": f"Say {w}", "input": "", "output": f"the {w} the {w}"} for w in WORDS]


def qwen3_folder(path: Path, arch: str = "Qwen3ForCausalLM") -> Path:
    """A random 2-layer model in Hugging Face's layout, with a tokenizer trained here."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, arch)
    torch.manual_seed(0)
    shape = dict(vocab_size=336, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    shape.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "Qwen3ForCausalLM":
        shape["head_dim"] = 8
    cls(cls.config_class(**shape)).save_pretrained(path)
    return train_tokenizer(path)  # tokenizer.json + tokenizer_config.json (eos <|im_end|>)


def _losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))  # the events live in the run folder itself
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def _checked_tokenizer(ckpt: Path) -> Any:
    """The checkpoint's tokenizer: the folder's hf tokenizer, chat specials one id each."""
    module = load_checkpoint(ckpt)
    tok = module.tokenizer
    assert module.hparams["tokenizer"]["kind"] == "hf" and tok.kind == "hf"
    specials = tok.special_tokens
    assert specials == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert tok.encode("<|im_end|>") == [2] and tok.eot_id == 2  # eos_token from the folder
    ids = tok.encode(CHAT)
    assert ids.count(1) == 2 and ids.count(2) == 2 and tok.decode(ids) == CHAT
    assert module.config.norm == "rmsnorm" and module.config.vocab_size == 336
    return module


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_text_finetune_from_hf_folder_uses_its_tokenizer(
    tmp_path: Path, llm_main: Any, arch: str
) -> None:
    init = qwen3_folder(tmp_path / "hf", arch)
    corpus = tmp_path / "chat.txt"
    corpus.write_text(CHAT * 40, encoding="utf-8")
    args = [
        f"init={init}",
        "task=text",
        f"data.path={corpus}",
        "block_size=32",
        "data.batch_size=8",
        "optim.lr=3e-3",
        "optim.min_lr=3e-3",
        *fast_overrides(tmp_path, 25),
    ]
    assert llm_main("finetune", *args) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 25
    module = _checked_tokenizer(ckpt)
    assert module.config.block_size == 32
    losses = _losses(tmp_path / "run")
    assert len(losses) == 25 and losses[0] > 5.0 and losses[-1] < losses[0] - 2.0, losses


@pytest.mark.slow
@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_instruct_finetune_from_qwen3_folder_closes_examples_with_im_end(
    tmp_path: Path, llm_main: Any, template: str
) -> None:
    """Alpaca records rendered with the Alpaca template (the default) or the folder's own chat
    template (task.template=chat), which the checkpoint then names for `llm chat`."""
    from llm.prompts import format_prompt, render_chat_template

    init = qwen3_folder(tmp_path / "hf")
    data = write_jsonl(tmp_path / "records.jsonl", RECORDS * 4)
    args = [
        f"init={init}",
        "task=instruct",
        f"task.template={template}",
        f"data.path={data}",
        "data.batch_size=4",
        "optim.lr=3e-3",
        "optim.min_lr=3e-3",
        "task.max_new_tokens=8",
        *fast_overrides(tmp_path, 20),
    ]
    assert llm_main("finetune", *args) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 20
    module = _checked_tokenizer(ckpt)
    assert module.config.block_size == 256  # the folder's context, uncropped
    losses = _losses(tmp_path / "run")
    assert len(losses) == 20 and losses[-1] < losses[0] - 1.0, losses
    assert module.hparams["template"] == template
    tok = module.tokenizer
    ids, n_prompt = encode_example(tok, RECORDS[0], 256, template)
    assert ids[-1] == 2 and tok.decode(ids[n_prompt:-1]) == "the fox the fox"
    user = [{"role": "user", "content": "Say fox"}]
    prompt = format_prompt(RECORDS[0]) if template == "alpaca" else render_chat_template(tok, user)
    assert tok.decode(ids[:n_prompt]) == prompt
    if template == "chat":  # the test folder's template has no generation prompt
        assert prompt == "<|im_start|>user\nSay fox<|im_end|>\n"
    responses = json.loads((tmp_path / "run" / "checkpoints" / "responses.json").read_text())
    assert len(responses) >= 1 and all("response" in r for r in responses)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_post_training_from_a_qwen3_folder_renders_its_chat_template(
    tmp_path: Path, llm_main: Any, task: str
) -> None:
    """The ladder's upper rungs run unchanged from Hugging Face weights: prompts rendered with
    the folder's chat template (task.template=auto), responses closed by its <|im_end|>."""
    from llm.finetuning.preference import encode_pair
    from llm.prompts import render

    init = qwen3_folder(tmp_path / "hf")
    if task == "dpo":
        rows = [{"prompt": f"Say {w}", "chosen": f"the {w}", "rejected": "no"} for w in WORDS]
        extra = ["task.beta=0.5"]
    else:
        rows = [{"prompt": f"Say {w}", "answer": f"the {w}"} for w in WORDS]
        extra = ["reward=format", "reward.pattern=.*the.*", "task.group_size=4",
                 "task.max_new_tokens=6"]  # fmt: skip
    data = write_jsonl(tmp_path / "records.jsonl", rows * 3)
    args = [f"init={init}", f"task={task}", f"data.path={data}", "data.batch_size=2",
            "optim.lr=1e-3", "optim.min_lr=1e-3", *extra, *fast_overrides(tmp_path, 4)]  # fmt: skip
    assert llm_main("finetune", *args) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = _checked_tokenizer(ckpt)
    assert module.hparams["template"] == "chat"  # llm chat renders as the run trained
    tok = module.tokenizer
    prompt = render("chat", [{"role": "user", "content": "Say fox"}], tok)
    assert prompt.startswith("<|im_start|>user\nSay fox<|im_end|>")
    if task == "dpo":
        pair = encode_pair(tok, rows[0], "chat", 256)
        assert pair.chosen[: pair.n_prompt] == tok.encode(prompt)
        assert pair.chosen[-1] == 2 and tok.decode(pair.chosen[pair.n_prompt : -1]) == "the fox"
    assert len(_losses(tmp_path / "run")) == 4
