"""Named kill points for fault-injection checks (``scripts/fault_check.py`` and the tests).

Long-running verbs call :func:`point` at the moments a kill is most likely to hurt (a shard
renamed but not yet recorded, a checkpoint half written, the middle of a validation). With
``LLM_FAULT=<name>[@<n>][:<SIGNAL>]`` in the environment, the ``n``-th time (default 1) the
process reaches ``<name>`` it sends itself ``SIGNAL`` (default SIGKILL): a kill at a named event
rather than after a sleep, so a test of it is deterministic. Without the variable a point costs
one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "LLM_FAULT"
_seen: Counter[str] = Counter()


def parse(spec: str) -> tuple[str, int, signal.Signals]:
    """``name[@n][:SIGNAL]`` -> (name, n, signal); a bad spec is refused with its form."""
    where, _, sig = spec.partition(":")
    name, _, count = where.partition("@")
    try:
        n = int(count) if count else 1
        signum = signal.Signals[(sig or "SIGKILL").upper()]
    except (ValueError, KeyError):
        raise ValueError(
            f"{ENV}={spec!r}: expected <event>[@<n>][:<SIGNAL>], e.g. {ENV}=train.step@3:SIGTERM"
        ) from None
    if not name or n < 1:
        raise ValueError(f"{ENV}={spec!r}: needs an event name and n >= 1")
    return name, n, signum


def point(name: str) -> None:
    """Mark event ``name``; the configured occurrence of it sends the configured signal."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, n, signum = parse(spec)
    if name != target:
        return
    _seen[name] += 1
    if _seen[name] == n:
        os.kill(os.getpid(), signum)
