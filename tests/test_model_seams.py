"""The model package's public seams: hidden_states, residual_stream and unembed, top_layers,
crop_block_size; no import
cycles inside llm/model; atomic_path for writers that need a path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from llm.io import atomic_open, atomic_path
from llm.model import GPT, GPTConfig

MODEL_DIR = Path(__file__).resolve().parents[1] / "llm" / "model"


def _gpt(**kw: object) -> GPT:
    torch.manual_seed(0)
    base: dict = dict(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16)
    return GPT(GPTConfig(**{**base, **kw})).eval()


def test_forward_is_lm_head_of_hidden_states() -> None:
    model = _gpt()
    idx = torch.randint(0, 50, (2, 9))
    h = model.hidden_states(idx)
    assert h.shape == (2, 9, 16)
    torch.testing.assert_close(model(idx)[0], model.lm_head(h), rtol=0, atol=0)


def test_top_layers_are_the_last_blocks_and_the_final_norm() -> None:
    model = _gpt()
    assert model.top_layers(0) == [model.ln_f]
    assert model.top_layers(2) == [model.h[1], model.h[2], model.ln_f]
    assert model.top_layers(3)[0] is model.h[0]
    with pytest.raises(ValueError, match=r"n_layer=3"):
        model.top_layers(4)


@pytest.mark.parametrize("kw", [{}, dict(n_kv_head=1, pos_encoding="rope", norm="rmsnorm")])
def test_residual_stream_unembed_is_forward(kw: dict) -> None:
    model = _gpt(**kw)
    idx = torch.randint(0, 50, (2, 9))
    stream = model.residual_stream(idx)
    assert len(stream) == 4 and all(x.shape == (2, 9, 16) for x in stream)
    torch.testing.assert_close(model.unembed(stream[-1]), model(idx)[0], rtol=0, atol=0)
    torch.testing.assert_close(model.ln_f(stream[-1]), model.hidden_states(idx), rtol=0, atol=0)
    ones = model.residual_stream(idx, head_mask=torch.ones(3, 2))
    assert all(torch.equal(a, b) for a, b in zip(ones, stream, strict=True))


def test_head_mask_zeroes_heads_before_they_are_mixed() -> None:
    model = _gpt()
    idx = torch.randint(0, 50, (1, 9))
    x = model.residual_stream(idx)[1]
    block, mask = model.h[1], torch.ones(3, 2)
    mask[1] = 0.0  # no head of block 1: its attention adds only c_proj's bias
    a = x + block.attn.c_proj.bias
    after = model.residual_stream(idx, head_mask=mask)[2]
    torch.testing.assert_close(after, a + block.mlp(block.ln_2(a)))
    mask[1, 0] = 1.0  # one head: its share of c_proj alone
    q, k, v = block.attn.qkv(block.ln_1(x))
    y = block.attn.attend(q, k, v)[:, :1].transpose(1, 2).reshape(1, 9, 8)
    a = x + y @ block.attn.c_proj.weight[:, :8].T + block.attn.c_proj.bias
    after = model.residual_stream(idx, head_mask=mask)[2]
    torch.testing.assert_close(after, a + block.mlp(block.ln_2(a)))


def test_residual_stream_edit_replaces_what_flows_on() -> None:
    model = _gpt()
    idx, other = torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 9))
    theirs = model.residual_stream(other)
    seen: list[int] = []

    def edit(point: int, x: torch.Tensor) -> torch.Tensor:
        seen.append(point)
        return theirs[2] if point == 2 else x

    ours = model.residual_stream(idx, edit)
    assert seen == [0, 1, 2, 3]
    assert torch.equal(ours[2], theirs[2]) and torch.equal(ours[3], theirs[3])


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_crop_block_size_keeps_the_first_positions(pos: str) -> None:
    model = _gpt(pos_encoding=pos)
    idx = torch.randint(0, 50, (2, 6))
    before = model(idx)[0]
    model.crop_block_size(6)
    assert model.config.block_size == 6
    torch.testing.assert_close(model(idx)[0], before, rtol=0, atol=0)
    tables = [b for n, b in model.named_buffers() if n.endswith(("pe", "cos", "sin"))]
    tables += [model.embed.wpe.weight] if pos == "learned" else []
    assert tables and all(t.size(0) == 6 for t in tables)
    with pytest.raises(ValueError, match="sequence length 7 exceeds block_size 6"):
        model(torch.randint(0, 50, (1, 7)))
    with pytest.raises(ValueError, match="only shrink"):
        model.crop_block_size(7)


def _imports(path: Path) -> set[str]:
    """Modules of llm.model that `path` imports anywhere (functions too), TYPE_CHECKING aside."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(n.removeprefix("llm.model.") for n in names if n.startswith("llm.model."))
        if isinstance(node, ast.Import):
            found.update(a.name.removeprefix("llm.model.") for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_no_import_cycles_in_the_model_package() -> None:
    modules = {p.stem for p in MODEL_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(MODEL_DIR / f"{m}.py") & modules for m in modules}
    assert "gpt" not in graph["hf"]  # the converter never builds a model

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start]
        )

    cycles = [m for m in modules if reaches(m, m, set())]
    assert not cycles, {m: graph[m] for m in cycles}


def test_atomic_path_replaces_on_success_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "w.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not replaced until the block succeeds
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]
    with atomic_open(target, "w") as f:  # atomic_open shares the code
        f.write("text")
    assert target.read_text() == "text" and len(list(tmp_path.iterdir())) == 1
