"""The benchmark scripts still run against the current configs (their figures are in the README;
a script broken by a config change would leave them unreproducible)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_model_counts_the_presets_and_generates() -> None:
    out = _script("bench_model.py", "--skip", "attention", "--gen-tokens", "8")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    # GPT-2's published sizes (tied embeddings counted once), from the composed presets
    assert rows["gpt2"][5] == "124,439,808"
    assert rows["gpt2-xl"][5] == "1,557,611,200"
    assert rows["baby"][5] == "30,018,816"
    assert "cache speedup:" in out
