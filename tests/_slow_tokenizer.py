"""A char tokenizer that takes its time, so that a test can signal a build while it runs.

It saves and names its cache as a plain CharTokenizer does: a plain one resumes its builds.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from llm.tokenizers import CharTokenizer


class SlowCharTokenizer(CharTokenizer):
    """CharTokenizer that sleeps ``delay`` seconds per encoded piece."""

    def __init__(self, *args: Any, delay: float = 0.05, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = float(delay)

    def encode_to_array(self, text: str) -> np.ndarray:
        time.sleep(self.delay)
        return super().encode_to_array(text)
