"""Sampling and the KV cache: determinism, greedy, filtering, stopping, cache == no cache."""

from __future__ import annotations

import pytest
import torch

from llm.model import GPT, GPTConfig, filter_logits, sample_next

V = 40


def make(pos: str = "learned", impl: str = "sdpa", block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=V, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
        pos_encoding=pos, attn_impl=impl, tie_weights=False,
    )  # fmt: skip
    model = GPT(cfg)
    with torch.no_grad():  # a peakier, input-dependent distribution than the 0.02 init gives
        model.lm_head.weight.normal_(std=0.3)
    return model


PROMPT = torch.tensor([[1, 2, 3], [4, 5, 6]])


def test_shape_and_mode_restored() -> None:
    model = make().train()
    out = model.generate(PROMPT, 5, seed=0)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], PROMPT)
    assert model.training
    model.eval()
    model.generate(PROMPT, 2, seed=0)
    assert not model.training


def test_seed_is_reproducible() -> None:
    model = make()
    a = model.generate(PROMPT, 20, seed=123)
    b = model.generate(PROMPT, 20, seed=123)
    c = model.generate(PROMPT, 20, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, model.generate(PROMPT, 20, seed=124))


def test_greedy_equals_argmax_loop() -> None:
    model = make().eval()
    out = model.generate(PROMPT, 10, temperature=0.0)
    idx = PROMPT
    for _ in range(10):
        nxt = model(idx)[0][:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    assert torch.equal(out, idx)


def test_top_k_1_is_greedy() -> None:
    model = make()
    greedy = model.generate(PROMPT, 12, temperature=0.0)
    assert torch.equal(model.generate(PROMPT, 12, top_k=1, seed=5), greedy)
    assert torch.equal(model.generate(PROMPT, 12, top_p=1e-6, seed=5), greedy)


def test_filter_logits() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # probs ~ [0.09, 0.64, 0.24, 0.03]: nucleus 0.7 needs the top two
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1.0)


def test_top_k_only_samples_from_top_k() -> None:
    logits = torch.randn(1, V).expand(2000, V)
    g = torch.Generator().manual_seed(0)
    samples = sample_next(logits, top_k=3, generator=g)
    assert set(samples.unique().tolist()) <= set(logits[0].topk(3).indices.tolist())


def test_stop_token_batch_of_one() -> None:
    model = make()
    full = model.generate(PROMPT[:1], 15, temperature=0.0)
    stop = int(full[0, 6])  # the 4th generated token
    first = next(i for i in range(3, 18) if full[0, i] == stop)
    out = model.generate(PROMPT[:1], 15, temperature=0.0, stop_token=stop)
    assert torch.equal(out, full[:, : first + 1])


def test_stop_token_batch_waits_for_all_rows() -> None:
    model = make()
    full = model.generate(PROMPT, 15, temperature=0.0)
    gen = full[:, 3:]
    common = set(gen[0].tolist()) & set(gen[1].tolist())
    assert common, "test needs a token both greedy rows produce"
    stop = min(common, key=lambda t: max(int((row == t).nonzero()[0]) for row in gen))
    firsts = [int((row == stop).nonzero()[0]) for row in gen]
    out = model.generate(PROMPT, 15, temperature=0.0, stop_token=stop)
    assert out.size(1) == 3 + max(firsts) + 1 < full.size(1)  # stopped once both rows had
    for row, first in enumerate(firsts):
        assert torch.equal(out[row, : 3 + first + 1], full[row, : 3 + first + 1])
        assert (out[row, 3 + first :] == stop).all()  # finished rows are padded with stop


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_cache_equals_no_cache_past_block_size(pos: str, impl: str) -> None:
    model = make(pos, impl, block_size=16)
    n = 30  # 3 + 30 tokens: well past block_size, so the context gets cropped and re-prefilled
    for kwargs in ({"temperature": 0.0}, {"seed": 7}, {"seed": 8, "top_k": 10, "top_p": 0.9}):
        cached = model.generate(PROMPT, n, use_cache=True, **kwargs)
        plain = model.generate(PROMPT, n, use_cache=False, **kwargs)
        assert cached.shape == (2, 3 + n)
        assert torch.equal(cached, plain), kwargs


def test_prompt_longer_than_block_size() -> None:
    model = make(block_size=8)
    prompt = torch.randint(0, V, (1, 20))
    out = model.generate(prompt, 5, temperature=0.0)
    assert torch.equal(out, model.generate(prompt, 5, temperature=0.0, use_cache=False))
    assert out.shape == (1, 25)


@pytest.mark.parametrize("use_cache", [True, False])
def test_empty_prompt_is_a_clear_error(use_cache: bool) -> None:
    model = make()
    with pytest.raises(ValueError, match="at least one token") as e:
        model.generate(torch.zeros(2, 0, dtype=torch.long), 3, use_cache=use_cache)
    assert "end-of-text" in str(e.value) and "(2, 0)" in str(e.value)


def test_stream_yields_the_tokens_generate_returns() -> None:
    from llm.model.generation import generate_stream

    model = make()
    for kwargs in ({"seed": 11}, {"temperature": 0.0}, {"seed": 2, "top_p": 0.8}):
        whole = model.generate(PROMPT, 25, **kwargs)
        streamed = list(generate_stream(model, PROMPT, 25, **kwargs))
        assert len(streamed) == 25 and all(t.shape == (2, 1) for t in streamed)
        assert torch.equal(torch.cat([PROMPT, *streamed], dim=1), whole), kwargs


def test_stream_with_a_cache_prefills_only_what_the_cache_lacks() -> None:
    """A chat's next turn: the cache holds the earlier tokens, only the new ones run."""
    from llm.model import KVCache
    from llm.model.generation import generate_stream

    model = make(block_size=32).eval()
    history = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    cache = KVCache(model.config.n_layer)
    with torch.no_grad():
        model(history[:, :5], cache=cache)  # the cache holds the first 5 tokens
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].size(1)))
    try:
        cached = list(generate_stream(model, history, 6, temperature=0.0, cache=cache))
    finally:
        hook.remove()
    assert seen == [2, 1, 1, 1, 1, 1]  # the 2 new tokens, then one per step
    assert cache.length == 7 + 6 - 1  # extended in place (the last token is not run yet)
    fresh = model.generate(history, 6, temperature=0.0)
    assert torch.equal(torch.cat([history, *cached], dim=1), fresh)
    with pytest.raises(ValueError, match="cache holds 12 tokens but idx only 7"):
        generate_stream(model, history, 1, cache=cache)


def test_last_only_is_the_last_row_of_the_full_logits() -> None:
    model = make().eval()
    idx = torch.randint(0, V, (2, 9))
    full, _ = model(idx)
    last, loss = model(idx, last_only=True)
    assert last.shape == (2, 1, V) and loss is None
    torch.testing.assert_close(last, full[:, -1:])
    with pytest.raises(ValueError, match="last_only=True computes no loss"):
        model(idx, idx, last_only=True)


def test_sampling_asks_the_model_for_the_last_position_only(monkeypatch) -> None:
    """Prefill and decode steps, with and without the cache: logits are (B, 1, vocab)."""
    model = make()
    shapes = []
    forward = GPT.forward

    def spy(self: GPT, *args: object, **kwargs: object) -> object:
        out = forward(self, *args, **kwargs)
        shapes.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(GPT, "forward", spy)
    for use_cache in (True, False):
        model.generate(torch.randint(0, V, (2, 6)), 3, seed=0, use_cache=use_cache)
    assert shapes == [(2, 1, V)] * 6
