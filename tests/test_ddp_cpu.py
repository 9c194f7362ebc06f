"""Two gloo processes train, checkpoint, and leave one run folder: `trainer=ddp_cpu` spawns its
ranks (ddp_spawn), `trainer.strategy=ddp` re-launches `llm train ...` for the second rank, as
multi-GPU runs do (the command line Lightning re-runs must be the user's, verb included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_overrides, write_corpus


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp"])
def test_ddp_cpu_trains_and_checkpoints(tmp_path: Path, strategy: str) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    logs = tmp_path / "logs"
    overrides = [
        "trainer=ddp_cpu",
        f"trainer.strategy={strategy}",
        *tiny_overrides(tmp_path, write_corpus(tmp_path)),
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "callbacks.sample_text.max_new_tokens=4",
    ]
    proc = run_cli("train", *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    lines = [line for line in text.splitlines() if line.strip("-= ")]  # not Lightning's rules
    twice = sorted({line for line in lines if lines.count(line) > 1})
    assert not twice, f"printed twice (by both ranks?): {twice}"
    assert sum(line.startswith("validation at step") for line in lines) == 3  # 0, 2, 4
    # the summary knows what rank 0 did, also when it ran in a spawned process
    assert "Best val/loss:   " in text and "(step 4)" in text, text
    assert "Last checkpoint: None" not in text and "Throughput:" in text
    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # the other rank does not start a Hydra run of its own
    ckpts = runs[0] / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert any(p.name.startswith("step") for p in ckpts.glob("*.ckpt"))
    raw = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["global_step"] == 4
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
def test_ddp_cpu_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Two ranks, stopped after 2 of 4 steps mid-epoch and resumed: each rank goes on with its
    own windows (ResumableDistributedSampler), so the weights are those of a straight run."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    corpus = write_corpus(tmp_path)

    def run(name: str, steps: int, *extra: str) -> Path:
        out = tmp_path / name
        overrides = [
            "trainer=ddp_cpu",
            *tiny_overrides(tmp_path, corpus),
            "model.dropout=0.0",
            "data.shard_tokens=512",  # windows span shards too
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "optim.warmup_steps=1",
            "optim.decay_steps=4",
            "callbacks.sample_text=null",
            f"output_dir={out}",
            *extra,
        ]
        proc = run_cli("train", *overrides, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out / "checkpoints" / "last.ckpt"

    straight = run("straight", 4)
    half = run("half", 2)
    resumed = run("resumed", 4, f"ckpt_path={half}")
    a = torch.load(straight, map_location="cpu", weights_only=True)
    b = torch.load(resumed, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0)
