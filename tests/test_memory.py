"""llm.memory: parameter counts of known models, the estimate's arithmetic, and the refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm import memory
from llm.model import GPT, GPTConfig


@pytest.mark.parametrize(
    ("sizes", "count"),
    [
        ({}, 124_439_808),  # GPT-2 small with its 50257-token vocabulary
        ({"n_layer": 24, "n_head": 16, "n_embd": 1024}, 354_823_168),  # GPT-2 medium
        ({"n_layer": 36, "n_head": 20, "n_embd": 1280}, 774_030_080),  # GPT-2 large
    ],
)
def test_parameter_counts_of_gpt2_sizes(sizes: dict, count: int) -> None:
    assert memory.parameter_count(GPTConfig(vocab_size=50257, **sizes)) == count


@pytest.mark.parametrize(
    "options",
    [
        {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2,
         "qk_norm": True, "tie_weights": False, "bias": False},
        {"pos_encoding": "sinusoidal", "mlp": "relu2", "head_dim": 8},
    ],
)  # fmt: skip
def test_parameter_count_is_the_built_models(options: dict) -> None:
    """One block stands for all of them: the count is that of the whole model, built."""
    config = GPTConfig(vocab_size=100, block_size=16, n_layer=3, n_head=4, n_embd=64, **options)
    assert memory.parameter_count(config) == GPT(config).num_params()


def test_a_model_too_large_to_build_is_counted_without_memory() -> None:
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=1_000_000)
    # 4 blocks of 12 n_embd^2 (+ biases, norms), the tied embedding, the position table
    assert memory.parameter_count(config) == 48_000_183_000_000


def test_estimate_adds_weights_optimizer_state_activations_and_logits() -> None:
    config = GPTConfig(vocab_size=50257)
    need = memory.estimate(config, batch_size=12, tokens=1024)
    params = 124_439_808
    assert need.weights == params * 16  # float32 weights, gradients, AdamW's two moments
    assert need.activations == 12 * 1024 * 768 * 12 * memory.ACTIVATION_VALUES * 4
    assert need.logits == 12 * 1024 * 50257 * 4
    assert need.total == need.weights + need.activations + need.logits
    mixed = memory.estimate(config, 12, 1024, precision="bf16-mixed", optimizer="muon")
    assert mixed.weights == params * (4 + 4 + 4) and mixed.activations == need.activations // 2
    lora = memory.estimate(config, 12, 1024, trainable=0.0, shards=2)
    assert lora.weights == params * 4 // 2
    inference = memory.estimate(config, training=False)
    assert (inference.weights, inference.activations, inference.logits) == (params * 4, 0, 0)


@pytest.mark.parametrize(
    ("precision", "sizes"),
    [("32-true", (4, 4)), ("32", (4, 4)), ("bf16-mixed", (4, 2)), ("16-mixed", (4, 2)),
     ("bf16-true", (2, 2)), ("64-true", (8, 8))],
)  # fmt: skip
def test_bytes_per_value_by_precision(precision: str, sizes: tuple[int, int]) -> None:
    assert memory.bytes_per_value(precision) == sizes


def test_check_fits_refuses_with_the_figures_and_names_what_to_lower(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "available", lambda device: 8 * memory.GIB)
    advice = ("lower model.n_embd", "lower data.batch_size")
    memory.check_fits(memory.Estimate(10, 8 * memory.GIB), "cpu", *advice)  # fits exactly
    batch = memory.Estimate(1000, 1 * memory.GIB, activations=20 * memory.GIB)
    with pytest.raises(memory.TooLarge) as e:
        memory.check_fits(batch, "cpu", *advice)
    assert str(e.value) == (
        "this run needs at least 21.0 GiB of memory (1,000 parameters: 1.0 GiB; activations of "
        "one batch: 20.0 GiB), but the CPU has 8.0 GiB available: lower data.batch_size"
    )
    weights = memory.Estimate(10**9, 30 * memory.GIB, logits=memory.GIB)
    with pytest.raises(memory.TooLarge, match=r"31\.0 GiB .* cuda:0 has 8\.0 GiB .*n_embd$"):
        memory.check_fits(weights, "cuda:0", *advice)
    monkeypatch.setattr(memory, "available", lambda device: None)  # unknown: nothing refused
    memory.check_fits(weights, "cpu", *advice)


def test_ram_available_reads_meminfo_and_a_cgroup_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo")
    line = next(x for x in meminfo.read_text().splitlines() if x.startswith("MemAvailable:"))
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory._ram_available() == pytest.approx(int(line.split()[1]) * 1024, rel=0.5)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 123)
    assert memory._ram_available() == 123  # a container's limit is lower than the host's RAM
