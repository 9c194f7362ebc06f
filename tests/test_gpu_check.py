"""scripts/gpu_check.py's plumbing, on the CPU (its figures need a GPU; see the README); its
FSDP2 step runs there on two gloo processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, ROOT, write_corpus


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_the_cpu(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, repeats=20)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "--device=cpu",
            "--steps=3",
            "--batch=2",
            f"--out={tmp_path / 'runs'}",
            f"--data-dir={tmp_path / 'data'}",
            "model=tiny",
            "data=text_files",
            f"data.path={corpus}",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line}
    for check in ("adamw", "muon", "generate", "fsdp"):
        assert rows[check][1] == "yes", proc.stdout
        assert float(rows[check][2].replace(",", "")) > 0  # tokens/s
    assert "greedy tokens equal: True" in proc.stdout
    for run in ("adamw", "muon"):
        assert (tmp_path / "runs" / run / "checkpoints" / "last.ckpt").is_file()
    # FSDP2 on two gloo processes: a distributed checkpoint, consolidated by llm export
    assert (tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt" / "__1_0.distcp").is_file()
    assert (tmp_path / "runs" / "fsdp.ckpt").is_file()
