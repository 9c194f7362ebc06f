"""The KV cache's buffer: the same kept keys and values as concatenating every step, written in
place, bounded by its capacity, and still differentiable under autograd."""

from __future__ import annotations

import random

import pytest
import torch

from llm.model import KVCache, LayerKVCache


class ConcatCache:
    """The cache as it was written first: concatenate, then keep the last window - 1."""

    def __init__(self, window: int | None) -> None:
        self.window, self.k = window, None

    def append(self, k: torch.Tensor) -> torch.Tensor:
        if self.k is not None:
            k = torch.cat([self.k, k], dim=-2)
        keep = k.size(-2) if self.window is None else min(k.size(-2), self.window - 1)
        self.k = k[..., k.size(-2) - keep :, :]
        return k


@pytest.mark.parametrize("window", [None, 1, 2, 5, 40])
@pytest.mark.parametrize("capacity", [None, 200])
def test_buffer_keeps_what_concatenation_keeps(window: int | None, capacity: int | None) -> None:
    rng = random.Random(0)
    cache, ref = LayerKVCache(window, capacity), ConcatCache(window)
    seen = 0
    for _ in range(60):  # chunks of every size, past several compactions and regrowths
        T = rng.choice([1, 1, 1, 2, 7, 30])
        k = torch.randn(2, 3, T, 4)
        got_k, got_v = cache.append(k, 2 * k)
        expected = ref.append(k)
        seen += T
        assert torch.equal(got_k, expected) and torch.equal(got_v, 2 * expected)
        assert cache.k is not None and torch.equal(cache.k, ref.k)
        assert cache.kept == ref.k.size(-2) and cache.length == seen


def test_a_step_writes_in_place_instead_of_copying_the_past() -> None:
    cache = LayerKVCache()
    first, _ = cache.append(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    second, _ = cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert second.data_ptr() == first.data_ptr()  # the same buffer, one token longer
    assert second.shape == (1, 2, 6, 4) and torch.equal(second[..., :5, :], first)


def test_capacity_bounds_the_buffer() -> None:
    cache = LayerKVCache(capacity=10)
    for _ in range(10):
        k, _ = cache.append(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    assert k.untyped_storage().nbytes() == 10 * 2 * 4  # float32: no doubling past 10 tokens


def test_reset_forgets_and_the_batch_size_is_checked() -> None:
    cache = KVCache(2, window=3)
    for layer in cache:
        layer.append(torch.randn(2, 1, 4, 2), torch.randn(2, 1, 4, 2))
    assert (cache.length, cache.kept) == (4, 2)
    with pytest.raises(ValueError, match=r"a batch of 1 do not fit a cache of a batch of 2.*reset"):
        cache[0].append(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    cache.reset()
    assert (cache.length, cache.kept, cache[0].k) == (0, 0, None)
    cache[0].append(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))  # another batch size now
    assert cache[0].kept == 1


def test_gradients_flow_through_a_cache() -> None:
    """Under autograd the cache concatenates: an in-place write would break backward."""
    cache = LayerKVCache()
    a = torch.randn(1, 1, 3, 2, requires_grad=True)
    b = torch.randn(1, 1, 1, 2, requires_grad=True)
    cache.append(a, a)
    k, v = cache.append(b, b)
    (k.sum() + v.sum()).backward()
    assert a.grad is not None and b.grad is not None
    assert torch.equal(a.grad, torch.full_like(a, 2.0)) and torch.equal(
        b.grad, torch.full((1, 1, 1, 2), 2.0)
    )


def test_a_cache_filled_while_sampling_takes_plain_forwards_after() -> None:
    """Sampling runs under inference mode, whose tensors cannot be written outside it: a
    chat's cache, extended by generate_stream, still takes a plain forward afterwards."""
    cache = LayerKVCache()
    with torch.inference_mode():
        cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    before = cache.k.clone() if cache.k is not None else None
    with torch.no_grad():
        k, _ = cache.append(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert before is not None and not k.is_inference()
    assert torch.equal(k[..., :3, :], before) and torch.equal(k[..., 3:, :], torch.ones(1, 2, 1, 4))
