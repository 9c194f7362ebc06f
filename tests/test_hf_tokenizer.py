"""tokenizer=hf: a Hugging Face tokenizer.json behind our Tokenizer interface, and a Llama /
Qwen3 folder that finetuning starts from with its own tokenizer."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from _hf_utils import CHAT_TEMPLATE, SPECIALS, train_tokenizer
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from llm.initial_weights import load_init
from llm.tokenizers import HFTokenizer, Tokenizer, tokenizer_from_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
TEXTS = [
    "the quick brown fox",
    "héllo wörld 日本語 🙂 and unseen: Ωμέγα ∑",
    "<|im_start|>user\nhello there<|im_end|>\n<|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def test_round_trips_and_specials(folder: Path) -> None:
    tok = HFTokenizer(folder)
    assert isinstance(tok, Tokenizer) and tok.kind == "hf"
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.special_tokens == {s: i for i, s in enumerate(SPECIALS)}
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == tok.special_tokens["<|im_start|>"] and ids[-1] == tok.eot_id == 2
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert "".join(tok.pieces(tok.encode("the quick"))) == "the quick"
    assert tok.vocab_size == 320 and tok.chat_template == CHAT_TEMPLATE
    assert tok.encode("the")[0] != tok.special_tokens["<|endoftext|>"]  # no BOS added


def test_eot_falls_back_to_endoftext(tmp_path: Path) -> None:
    tok = HFTokenizer(train_tokenizer(tmp_path, eos_token=None) / "tokenizer.json")  # the file
    assert tok.eos_token == "<|endoftext|>" and tok.eot_id == 0


def test_checkpoint_dict_rebuilds_the_same_tokenizer(folder: Path) -> None:
    tok = HFTokenizer(folder)
    d = tok.to_dict()
    buf = io.BytesIO()
    torch.save({"tokenizer": d}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["tokenizer"]
    again = tokenizer_from_dict(loaded)
    assert type(again) is HFTokenizer and again.to_dict() == d
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert (again.eot_id, again.identity()) == (tok.eot_id, tok.identity())
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers
    assert clone.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.path must be a Hugging Face"):
        HFTokenizer(tmp_path)


def test_hydra_option(folder: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="tokenize",
            overrides=["tokenizer=hf", f"tokenizer.path={folder}", "text=hi"],
        )
    tok = instantiate(cfg.tokenizer)
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode("hello")) == "hello"


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_load_init_brings_the_folders_tokenizer(folder: Path, tmp_path: Path, arch: str) -> None:
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, arch)
    torch.manual_seed(0)
    shape = dict(vocab_size=336, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    shape.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cls(cls.config_class(**shape)).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    init = load_init(tmp_path, block_size=32)
    assert init.model["block_size"] == 32 and init.model["norm"] == "rmsnorm"
    assert init.tokenizer is not None and init.tokenizer["kind"] == "hf"
    tok = tokenizer_from_dict(init.tokenizer)
    assert tok.vocab_size <= init.model["vocab_size"] and tok.eot_id == 2
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    assert init.state_dict["embed.wte.weight"].shape == (336, 32)
