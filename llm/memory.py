"""A rough lower bound on the memory a model, and one training batch of it, take, checked
against what the machine has before anything is allocated.

A mistyped ``data.batch_size=100000000`` or ``model.n_embd=1000000`` (or a Hugging Face
config.json that says ``hidden_size: 1000000``) otherwise ends in the kernel's OOM killer
minutes later, or in a raw allocator error. The figures are deliberately low (the real peak is
higher), so a refusal means the run clearly cannot fit:

- weights: parameters x bytes each, plus, when training, a gradient and the optimizer's state
  (AdamW: two values) for each trainable parameter;
- activations kept for the backward pass: batch x tokens x n_embd x n_layer x
  ``ACTIVATION_VALUES`` values (a GPT-2 block keeps about 16 per channel);
- the logits: batch x tokens x output width, in float32 (the loss upcasts them).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
ACTIVATION_VALUES = 8  # values kept per token, channel and layer (half a GPT-2 block's ~16)
OPTIMIZER_VALUES = {"adamw": 2, "muon": 1}  # state per parameter (Muon: momentum on matrices)


class TooLarge(ValueError):
    """The model or its batch cannot fit in the memory this machine has."""


@dataclass(frozen=True)
class Estimate:
    """Bytes by part; ``total`` is what is compared with the memory available."""

    params: int  # the parameter count
    weights: int  # parameters (and, training, their gradients and optimizer state)
    activations: int = 0
    logits: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.logits

    @property
    def batch(self) -> int:
        """What one batch adds: the part a smaller batch or context shrinks."""
        return self.activations + self.logits


def parameter_count(config: Any) -> int:
    """Parameters of the model ``config`` (a GPTConfig) describes, tied weights once.

    Counted on the meta device (shapes, no memory), with one block standing for all n_layer of
    them, so even a model far too large to build is counted at once.
    """
    import torch

    from llm.model import GPT

    with torch.device("meta"):
        model = GPT(dataclasses.replace(config, n_layer=1))
    block = sum(p.numel() for p in model.h[0].parameters())
    return model.num_params() + (config.n_layer - 1) * block


def bytes_per_value(precision: Any) -> tuple[int, int]:
    """(weights, activations) bytes per value under a Lightning ``trainer.precision``."""
    name = str(precision).lower()
    if name.startswith("64"):
        return 8, 8
    if name.startswith(("16", "bf16")):
        return (2, 2) if name.endswith("-true") else (4, 2)  # mixed: float32 master weights
    return 4, 4


def estimate(
    config: Any,
    batch_size: int = 0,
    tokens: int | None = None,
    *,
    training: bool = True,
    trainable: float = 1.0,
    optimizer: str = "adamw",
    precision: Any = "32-true",
    outputs: int | None = None,
    shards: int = 1,
) -> Estimate:
    """The lower bound of the module docstring for ``batch_size`` sequences of ``tokens``
    (default: the context) through the model of ``config``.

    ``trainable``: the share of parameters that get a gradient and optimizer state (0 for
    LoRA, whose adapters are small); ``outputs``: the width of the logits (default: the
    vocabulary; a classifier's: its labels); ``shards``: devices that split the weights (FSDP).
    """
    params = parameter_count(config)
    weight_bytes, act_bytes = bytes_per_value(precision)
    per_param = weight_bytes
    if training:
        per_param += trainable * (weight_bytes + 4 * OPTIMIZER_VALUES.get(optimizer, 1))
    sequences = batch_size * (config.block_size if tokens is None else tokens)
    acts = sequences * config.n_embd * config.n_layer * ACTIVATION_VALUES * act_bytes
    width = config.vocab_size if outputs is None else outputs
    return Estimate(
        params=params,
        weights=int(params * per_param) // max(shards, 1),
        activations=acts if training else 0,
        logits=sequences * width * 4,
    )


def available(device: str = "cpu") -> int | None:
    """Bytes free for a new allocation on ``device`` (``cpu``, ``cuda``, ``cuda:N``); None
    where it cannot be told (then nothing is refused)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return _ram_available()


def _ram_available() -> int | None:
    """MemAvailable (/proc/meminfo), lowered to a cgroup's limit where one is set; else the
    physical memory."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_room()
    if limit is not None:
        found.append(limit)
    if not found:
        try:
            found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return min(found)


def _cgroup_room() -> int | None:
    """What a cgroup v2 memory limit leaves (memory.max - memory.current), or None."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        return max(int(limit) - int(used), 0)
    except (OSError, ValueError):  # no cgroup v2, or "max": no limit
        return None


def human(n: float) -> str:
    """Bytes for people: 0.3 GiB, 45,776.0 GiB."""
    if n < GIB / 10:
        return f"{n / 1024**2:,.1f} MiB"
    return f"{n / GIB:,.1f} GiB"


def check_fits(
    need: Estimate, device: str, weights_advice: str, batch_advice: str, what: str = "this run"
) -> None:
    """Refuse with the figures when ``need`` exceeds what ``device`` has free, with
    ``weights_advice`` where the weights are most of it, else ``batch_advice``."""
    free = available(device)
    if free is None or need.total <= free:
        return
    where = "the CPU" if device == "cpu" else device
    parts = [f"{need.params:,} parameters: {human(need.weights)}"]
    for name, size in (("activations of one batch", need.activations), ("its logits", need.logits)):
        if size >= need.total / 100:  # the parts that matter
            parts.append(f"{name}: {human(size)}")
    advice = weights_advice if need.weights >= need.batch else batch_advice
    raise TooLarge(
        f"{what} needs at least {human(need.total)} of memory ({'; '.join(parts)}), but "
        f"{where} has {human(free)} available: {advice}"
    )


def check_pretrained_fits(config: Any, path: Path) -> None:
    """Refuse a config.json whose model cannot fit in this machine's memory (a typo'd or crafted
    size), before its weights are read or its tensors allocated."""
    sizes = "hidden_size/n_embd, num_hidden_layers/n_layer, intermediate_size, vocab_size"
    advice = f"check the sizes in {path / 'config.json'} ({sizes})"
    need = estimate(config, training=False)
    check_fits(need, "cpu", advice, advice, what=f"the model of {path / 'config.json'}")
