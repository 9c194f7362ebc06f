"""Shared test setup: point tiktoken at the pre-filled offline cache when it exists."""

import os
from pathlib import Path

_CACHE = Path(__file__).resolve().parents[1].parent / "shared" / "tiktoken_cache"
if _CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_CACHE))
