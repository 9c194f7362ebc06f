"""Progress of a token cache build: MB/s, tokens and ETA, for `llm prepare` and `llm train` alike.

On a terminal, a tqdm bar; elsewhere (a log file, a batch job), one plain log line every
``every`` seconds, with no carriage returns or escape codes to garble the log.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

from tqdm import tqdm

log = logging.getLogger(__name__)


def _size(n: float) -> str:
    return tqdm.format_sizeof(n, "B", 1000)


def _count(n: float) -> str:
    return tqdm.format_sizeof(n, "", 1000)


class BuildProgress:
    """Counts text bytes and tokens done; the total comes from the corpus size or ``max_tokens``.

    ``max_tokens`` gives an ETA too (bytes per token so far), also where the corpus size is not
    known (a stream); without either, only rates are shown. ``initial_*`` are what a resumed
    build had already done.
    """

    def __init__(
        self,
        desc: str,
        total_bytes: int | None = None,
        max_tokens: int | None = None,
        initial_bytes: int = 0,
        initial_tokens: int = 0,
        stream: IO[str] | None = None,
        every: float = 10.0,
    ) -> None:
        self.desc = desc
        self.total_bytes = total_bytes
        self.max_tokens = max_tokens
        self.bytes = int(initial_bytes)
        self.tokens = int(initial_tokens)
        self._start_bytes = self.bytes
        self.every = float(every)
        self._t0 = self._last = time.monotonic()
        stream = sys.stderr if stream is None else stream
        self._bar: Any = None
        if _isatty(stream):
            self._bar = tqdm(
                desc=desc,
                total=self._total(),
                initial=self.bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=stream,
                dynamic_ncols=True,
                leave=True,
            )
            self._bar.set_postfix_str(self._tokens_text(), refresh=False)

    def _total(self) -> int | None:
        capped = None
        if self.max_tokens and self.tokens:  # the bytes the cap will take, at the rate so far
            capped = max(self.bytes, int(self.bytes * self.max_tokens / self.tokens))
        if self.total_bytes is None:
            return capped
        return self.total_bytes if capped is None else min(self.total_bytes, capped)

    def _tokens_text(self) -> str:
        cap = f"/{_count(self.max_tokens)}" if self.max_tokens else ""
        return f"{_count(self.tokens)}{cap} tokens"

    def update(self, nbytes: int, ntokens: int) -> None:
        """Add a finished task's text bytes and tokens."""
        self.bytes += int(nbytes)
        self.tokens += int(ntokens)
        if self._bar is not None:
            total = self._total()
            if total != self._bar.total:
                self._bar.total = total
            self._bar.set_postfix_str(self._tokens_text(), refresh=False)
            self._bar.update(int(nbytes))
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            log.info("%s", self.line())

    def line(self) -> str:
        """One plain progress line: done, rate, tokens, ETA."""
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.bytes - self._start_bytes) / elapsed
        total = self._total()
        done = _size(self.bytes)
        eta = ""
        if total:
            done += f" of {_size(total)} ({100 * min(self.bytes / total, 1):.1f}%)"
            if rate > 0:
                eta = f", ETA {tqdm.format_interval(max(total - self.bytes, 0) / rate)}"
        return f"{self.desc}: {done}, {_size(rate)}/s, {self._tokens_text()}{eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
