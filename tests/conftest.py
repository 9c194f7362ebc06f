"""Shared test setup: point tiktoken at the pre-filled offline cache when it exists."""

import os
from pathlib import Path

_CACHE = Path(__file__).resolve().parents[1].parent / "shared" / "tiktoken_cache"
if _CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_CACHE))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n 2` on 2 cores: two workers that each spin up all cores' worth of threads slow each
    # other down several times over on small ops; one thread each (CLI subprocesses included)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
