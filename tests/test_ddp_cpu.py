"""`trainer=ddp_cpu`: two gloo processes (ddp_spawn) train, checkpoint, and leave one run dir."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40


@pytest.mark.slow
def test_ddp_cpu_trains_and_checkpoints(tmp_path: Path) -> None:
    pytest.importorskip("llm.tokenizers")
    import os
    import subprocess
    import sys

    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 3, encoding="utf-8")
    logs = tmp_path / "logs"
    overrides = [
        "trainer=ddp_cpu",
        "model=tiny",
        "tokenizer=char",
        "data=text_files",
        f"data.path={corpus}",
        "data.batch_size=4",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.sample_text.max_new_tokens=4",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={logs}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "llm.train", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # the spawned ranks do not start Hydra runs of their own
    ckpts = runs[0] / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert any(p.name.startswith("step") for p in ckpts.glob("*.ckpt"))
    raw = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["global_step"] == 4
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "lightning_logs").exists()
