"""A run or build stopped by a signal, as one exception the ``llm`` command turns into the
signal's exit status (128 + signal number: 130 for Ctrl-C, 143 for SIGTERM)."""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """Stopped by ``signum``; the message says what was kept and how to go on."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
