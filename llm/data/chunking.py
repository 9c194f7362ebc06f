"""Cut documents into pieces that encode to the same ids as the whole, and group them into tasks.

Piece boundaries are a function of each document's text alone (not of how it was read, nor of
the number of workers), so a build that resumes at a recorded ``(document, char)`` piece start
makes exactly the pieces, and so the ids, of an uninterrupted one.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from llm.tokenizers.base import special_regex

CHUNK_CHARS = 1 << 20  # tokenize at most ~1 MB of text at a time
TASK_CHARS = 1 << 20  # ~1 MB of text per parallel task: ~0.2 s of gpt2 encoding

# Places where no GPT-2/cl100k/o200k/BPE pre-token crosses: between a letter and a newline, or
# between a non-space character and a single space that starts a word ("end| word").
_SAFE_CUT = re.compile(r"(?<=[^\W\d_])\n|(?<=\S) (?=[^\W\d_])")
_TAIL = 256  # look for the last safe cut in the window's last 256, 4096, ... characters


class _Cutter:
    """Where the piece that starts at ``start`` ends: see :func:`split_text`."""

    def __init__(self, max_chars: int, specials: Iterable[str]) -> None:
        specials = [s for s in specials if s]
        self.max_chars = int(max_chars)
        if self.max_chars <= 0:
            raise ValueError(f"max_chars must be positive, got {max_chars}")
        self.special = special_regex(specials)
        self.longest = max((len(s) for s in specials), default=0)

    def cut(self, text: str, start: int) -> int:
        end = start + self.max_chars
        spans: list[tuple[int, int]] = []
        if self.special is not None:  # a piece never starts inside a special token
            stop = min(end + self.longest, len(text))
            spans = [m.span() for m in self.special.finditer(text, start, stop)]
        starts = [a for a, _ in spans]
        width = _TAIL
        while True:  # the last safe place: searched from the end, not matched all the way
            lo = max(start + 1, end - width)
            found = [
                m.start()
                for m in _SAFE_CUT.finditer(text, lo, end)
                if not _inside(m.start(), spans, starts)
            ]
            if found:
                return found[-1]
            if lo == start + 1:
                break
            width *= 16
        cut = end  # no safe place: cut hard, but before (or after) a special token
        for a, b in spans:
            if a < cut < b:
                cut = a if a > start else b
        return cut


def _inside(pos: int, spans: list[tuple[int, int]], starts: list[int]) -> bool:
    i = bisect.bisect_left(starts, pos) - 1
    return i >= 0 and spans[i][0] < pos < spans[i][1]


def split_text(
    text: str, max_chars: int = CHUNK_CHARS, specials: Iterable[str] = ()
) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` where encoding can't tell the difference.

    Each cut is at the last safe place (see ``_SAFE_CUT``) in the window that is not inside one
    of the ``specials`` (a cut there would split a special token into plain text), so encoding
    the pieces one by one gives the same ids as encoding the whole text; without one, a hard
    cut, moved off any special token it would split.
    """
    cutter = _Cutter(max_chars, specials)
    start, n = 0, len(text)
    while n - start > cutter.max_chars:
        cut = cutter.cut(text, start)
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def iter_pieces(
    blocks: Iterable[tuple[int, str]],
    max_chars: int = CHUNK_CHARS,
    specials: Iterable[str] = (),
    start_char: int = 0,
) -> Iterator[tuple[int, int, str]]:
    """``(document, char offset, piece)`` of documents read as ``(document, text block)`` pairs.

    The pieces of each document are those of ``split_text`` on its whole text, but only
    ``max_chars`` plus a block are held at a time. Every document gives at least one piece ("" for
    an empty one: it still gets its end-of-text). A resumed build passes ``start_char``, a piece
    start an earlier build recorded: the first document's blocks still start at its char 0 (a
    corpus reads a document from its start), and the text before ``start_char`` is skipped.
    """
    cutter = _Cutter(max_chars, specials)
    need = cutter.max_chars + cutter.longest  # text a cut may look at, past the piece start
    doc: int | None = None
    buf, base, emitted = "", 0, False
    skip = max(0, int(start_char))  # the first document's text before it is not read again
    for d, text in blocks:
        if d != doc:
            if doc is not None:
                yield from _flush(cutter, doc, buf, base, emitted)
                skip = 0
            resumed = doc is None and skip > 0  # an earlier build emitted its first pieces
            buf, base, emitted = "", (start_char if doc is None else 0), resumed
            doc = d
        if skip:
            text, skip = text[skip:], skip - min(skip, len(text))
            if skip or not text:
                continue
        buf += text
        pos = 0
        while len(buf) - pos > need:
            cut = cutter.cut(buf, pos)
            yield doc, base + pos, buf[pos:cut]
            emitted, pos = True, cut
        if pos:
            buf, base = buf[pos:], base + pos
    if doc is not None:
        yield from _flush(cutter, doc, buf, base, emitted)


def _flush(
    cutter: _Cutter, doc: int, buf: str, base: int, emitted: bool
) -> Iterator[tuple[int, int, str]]:
    pos = 0
    while len(buf) - pos > cutter.max_chars:
        cut = cutter.cut(buf, pos)
        yield doc, base + pos, buf[pos:cut]
        emitted, pos = True, cut
    if pos < len(buf) or not emitted:
        yield doc, base + pos, buf[pos:]


@dataclass
class Task:
    """Consecutive pieces encoded together: ``items`` are ``(end-of-text first?, text)``.

    ``doc`` and ``char`` locate its first piece: where a resumed build starts reading again.
    """

    index: int
    doc: int
    char: int
    items: list[tuple[bool, str]] = field(default_factory=list)


def iter_tasks(
    pieces: Iterable[tuple[int, int, str]], task_chars: int = TASK_CHARS, first_index: int = 0
) -> Iterator[Task]:
    """Group pieces into tasks of about ``task_chars``; a new document's first piece gets an
    end-of-text before it (none before the corpus's first document, as a single-process build)."""
    task: Task | None = None
    size = 0
    index = first_index
    for doc, char, piece in pieces:
        if task is None:
            task, size = Task(index, doc, char), 0
        task.items.append((doc > 0 and char == 0, piece))
        size += len(piece)
        if size >= task_chars:
            yield task
            task, index = None, index + 1
    if task is not None:
        yield task
