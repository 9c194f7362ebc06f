"""Text corpora: where raw text comes from, streamed document by document, with a stable checksum.

The checksum names the token cache, so a changed corpus can never reuse stale token ids.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from llm.io import atomic_open

log = logging.getLogger(__name__)

_READ_BLOCK = 1 << 20
TEXT_BLOCK = 8 << 20  # bytes of a file read at a time when streaming it


def _sha256_file(path: Path, h: Any | None = None) -> Any:
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            h.update(block)
    return h


def _hash_files(files: Iterable[tuple[str, Path]], h: Any | None = None) -> Any:
    """Hash each (name, file) as name, size and content, so a rename or an edit changes it."""
    h = h if h is not None else hashlib.sha256()
    for name, f in files:
        h.update(name.encode("utf-8") + b"\0")
        h.update(str(f.stat().st_size).encode() + b"\0")
        _sha256_file(f, h)
    return h


def read_utf8(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 file; a bad byte raises ValueError naming the file and the byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data[e.start], e.start, e.reason) from e


def _not_utf8(path: str | os.PathLike[str], byte: int, offset: int, reason: str) -> ValueError:
    return ValueError(
        f"{path} is not valid UTF-8: byte {byte:#04x} at byte offset {offset} ({reason}). "
        f"Convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove it."
    )


def iter_utf8(path: str | os.PathLike[str], block: int | None = None) -> Iterator[str]:
    """Read a UTF-8 file ``block`` bytes (default ``TEXT_BLOCK``) at a time: memory stays
    bounded by the block whatever the file size.

    A bad byte raises the ValueError of :func:`read_utf8`, naming the byte offset in the file.
    """
    block = block or TEXT_BLOCK
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            final = not data
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as e:
                offset = consumed - pending + e.start
                raise _not_utf8(path, e.object[e.start], offset, e.reason) from e
            consumed += len(data)
            if text:
                yield text
            if final:
                return


class Corpus:
    """Base class: a named source of text documents with a content checksum."""

    name: str = "corpus"
    path: Path

    def iter_documents(self) -> Iterator[str]:
        """Yield the documents in a fixed order (end-of-text is inserted between them)."""
        raise NotImplementedError

    def iter_blocks(self, start_doc: int = 0) -> Iterator[tuple[int, str]]:
        """``(document index, text)`` from document ``start_doc`` on; a long document may come
        as several consecutive blocks, an empty one as ``""``.

        The token cache reads this way, so that a huge file is never held in memory whole and a
        resumed build skips the documents it has encoded without reading them where it can.
        """
        for i, doc in enumerate(self.iter_documents()):
            if i >= start_doc:
                yield i, doc

    def size_bytes(self) -> int | None:
        """UTF-8 bytes of text in the corpus when cheap to know (for an ETA), else None."""
        return None

    def checksum(self) -> str:
        """Hex sha256 identifying the content; it keys the token cache."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r})"


class TinyShakespeare(Corpus):
    """Karpathy's tiny shakespeare (1.1 MB): downloaded once to ``path``, sha256 checked."""

    URL = (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    )
    SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

    def __init__(
        self,
        path: str | os.PathLike[str] = "data/tinyshakespeare/input.txt",
        url: str = URL,
        sha256: str = SHA256,
    ) -> None:
        self.path = Path(path)
        self.url = url
        self.sha256 = sha256
        self.name = "tinyshakespeare"

    def ensure(self) -> Path:
        """Download the file when absent; verify its sha256 either way."""
        if not self.path.exists():
            self._download()
        digest = _sha256_file(self.path).hexdigest()
        if digest != self.sha256:
            raise ValueError(
                f"{self.path} has sha256 {digest}, expected {self.sha256}: the file is corrupt "
                f"or not tiny shakespeare. Delete it to re-download from {self.url}."
            )
        return self.path

    def _download(self) -> None:
        log.info("downloading %s -> %s", self.url, self.path)
        try:
            with urllib.request.urlopen(self.url, timeout=60) as r:
                data = r.read()
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(
                f"could not download tiny shakespeare ({e}). Offline? Put the file at "
                f"{self.path.resolve()} (download it from {self.url})."
            ) from e
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise ValueError(
                f"downloaded {self.url} has sha256 {digest}, expected {self.sha256}; "
                f"nothing was written to {self.path}."
            )
        with atomic_open(self.path, "wb") as f:
            f.write(data)

    def iter_documents(self) -> Iterator[str]:
        yield read_utf8(self.ensure())

    def iter_blocks(self, start_doc: int = 0) -> Iterator[tuple[int, str]]:
        if start_doc == 0:
            yield from ((0, t) for t in _blocks_or_empty(self.ensure()))

    def size_bytes(self) -> int | None:
        return self.ensure().stat().st_size

    def checksum(self) -> str:
        self.ensure()
        return self.sha256


class TextFiles(Corpus):
    """Local UTF-8 text: a file, a folder (recursive, by ``pattern``) or a glob; a file = a doc."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        pattern: str | Sequence[str] = ("*.txt", "*.md"),
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.pattern = [pattern] if isinstance(pattern, str) else list(pattern)
        self.name = name or self.path.stem or "text_files"

    def files(self) -> list[Path]:
        """The matching files, sorted so the order (and the checksum) is stable."""
        p = str(self.path)
        if self.path.is_file():
            found = [self.path]
        elif self.path.is_dir():
            found = {f for pat in self.pattern for f in self.path.rglob(pat) if f.is_file()}
        elif glob.has_magic(p):
            found = {Path(f) for f in glob.glob(p, recursive=True) if Path(f).is_file()}
        else:
            found = []
        files = sorted(found)
        if not files:
            what = f"matching {self.pattern} " if self.path.is_dir() else ""
            raise FileNotFoundError(f"no text files {what}found at {self.path}")
        return files

    def _rel(self, f: Path) -> str:
        base = self.path if self.path.is_dir() else f.parent
        return f.relative_to(base).as_posix() if f.is_relative_to(base) else f.name

    def iter_documents(self) -> Iterator[str]:
        for f in self.files():
            yield read_utf8(f)

    def iter_blocks(self, start_doc: int = 0) -> Iterator[tuple[int, str]]:
        files = self.files()
        for i in range(start_doc, len(files)):
            yield from ((i, t) for t in _blocks_or_empty(files[i]))

    def size_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.files())

    def checksum(self) -> str:
        return _hash_files((self._rel(f), f) for f in self.files()).hexdigest()


def _blocks_or_empty(path: Path) -> Iterator[str]:
    empty = True
    for text in iter_utf8(path):
        empty = False
        yield text
    if empty:
        yield ""


_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _packaged_builders() -> set[str]:
    """Builder names (json, csv, ...) whose relative data_files are resolved from the cwd."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:  # private name: fall back to the common ones if it ever moves
        return {*_LOCAL_BUILDERS.values(), "text", "arrow", "pandas"}
    return set(_PACKAGED_DATASETS_MODULES)


def _patterns(data_files: Any) -> list[str]:
    """The path patterns of a data_files argument (str, list, or dict of split -> either)."""
    if data_files is None:
        return []
    if isinstance(data_files, (str, os.PathLike)):
        return [str(data_files)]
    if isinstance(data_files, Mapping):  # also an OmegaConf DictConfig from Hydra
        return [p for v in data_files.values() for p in _patterns(v)]
    return [p for v in data_files for p in _patterns(v)]


class HFDataset(Corpus):
    """A Hugging Face dataset (hub id or local .jsonl/.json/.parquet/.csv file); a row = a doc."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        split: str = "train",
        text_column: str = "text",
        streaming: bool = True,
        data_files: Any = None,
    ) -> None:
        self.path = Path(path)
        self.hf_path = str(path)
        self.config_name = name
        self.split = split
        self.text_column = text_column
        self.streaming = streaming
        if isinstance(data_files, DictConfig | ListConfig):  # from Hydra; datasets wants
            data_files = OmegaConf.to_container(data_files, resolve=True)  # plain dicts/lists
        self.data_files = data_files
        self.name = f"{self.path.stem if self.is_local else self.hf_path}:{split}"

    @property
    def is_local(self) -> bool:
        return self.path.suffix.lower() in _LOCAL_BUILDERS and self.path.is_file()

    def _load(self) -> Any:
        import datasets

        if self.is_local:
            builder = _LOCAL_BUILDERS[self.path.suffix.lower()]
            return datasets.load_dataset(
                builder, data_files=str(self.path), split=self.split, streaming=self.streaming
            )
        return datasets.load_dataset(
            self.hf_path,
            self.config_name,
            split=self.split,
            streaming=self.streaming,
            data_files=self.data_files,
        )

    def iter_documents(self) -> Iterator[str]:
        ds = self._load()
        columns = getattr(ds, "column_names", None)
        if columns is not None and self.text_column not in columns:
            raise KeyError(self._missing(columns))
        for row in ds:
            if self.text_column not in row:
                raise KeyError(self._missing(list(row)))
            text = row[self.text_column]
            if text:
                yield str(text)

    def _missing(self, columns: Sequence[str]) -> str:
        return (
            f"dataset {self.hf_path} has no text column {self.text_column!r}; "
            f"its columns are {list(columns)}. Set text_column to one of them."
        )

    def local_files(self) -> list[tuple[str, Path]]:
        """(name, path) of the local files a folder or local data_files reads; [] for the Hub.

        A folder counts all its files (hidden ones aside, as datasets skips them): hashing a
        file datasets ignores only costs a rebuild, missing one would reuse a stale cache.
        """
        is_dir = self.path.is_dir()
        base: Path | None = None
        if is_dir:
            base = self.path
        elif self.hf_path in _packaged_builders():
            base = Path.cwd()
        found: set[Path] = set()
        for pat in _patterns(self.data_files):
            if "://" in pat:
                continue
            if not os.path.isabs(pat):
                if base is None:  # relative to a Hub repo, not to anything here
                    continue
                pat = str(base / pat)
            found.update(Path(f) for f in glob.glob(pat, recursive=True) if Path(f).is_file())
        if self.data_files is None and is_dir:
            found.update(
                f
                for f in self.path.rglob("*")
                if f.is_file()
                and not any(p.startswith(".") for p in f.relative_to(self.path).parts)
            )

        def name(f: Path) -> str:
            return f.relative_to(base).as_posix() if base and f.is_relative_to(base) else str(f)

        return [(name(f), f) for f in sorted(found)]

    def checksum(self) -> str:
        h = hashlib.sha256()
        key = {"split": self.split, "text_column": self.text_column, "name": self.config_name}
        if self.is_local:
            _sha256_file(self.path, h)
        else:
            # A local folder or local data_files: the builder's fingerprint ignores edits.
            _hash_files(self.local_files(), h)
            ds = self._load()
            fingerprint = getattr(ds, "_fingerprint", None)
            key["path"] = self.hf_path
            key["data_files"] = str(self.data_files)
            key["fingerprint"] = fingerprint
            if fingerprint is None:  # streaming: fall back to the builder's config and version
                info = getattr(ds, "info", None)
                key["info"] = repr(
                    (getattr(info, "config_name", None), str(getattr(info, "version", None)))
                )
        h.update(json.dumps(key, sort_keys=True).encode("utf-8"))
        return h.hexdigest()
