"""Continuous batching over one KV cache: requests join the running batch between decode steps
and leave it when they finish, so many clients share each forward pass.

One thread owns the model. A new request is prefilled alone (its own cache), then its rows are
merged into the batch's cache: rows are right-aligned, each row's own tokens end at the last
position and what is before them is left padding (``pad``), which the model masks and starts
each row's positions after (:meth:`llm.model.GPT.hidden_states`). A decode step runs every row's
last sampled token; a finished or abandoned row is dropped from the cache, and padding that no
row needs any more is dropped with it. Each row samples with its own settings and generator,
so a seeded request gives the same text alone or in a crowd (up to float rounding of batched
kernels).

The web side (:mod:`llm.serving.app`) hands in :class:`Job` objects and reads their events
from an asyncio queue; the engine never blocks on a client. Other work on the model (the page's
inspect view) is handed in with :meth:`Engine.call`: it runs on the same thread between two
decode steps, so no two forward passes ever share the model at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from llm.inference import IncrementalDecoder
from llm.model import GPT, KVCache
from llm.model.generation import sample_next
from llm.tokenizers import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """One choice's settings, as the API's request gave them (already checked)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None  # how many alternatives per token; None: no logprobs
    echo: bool = False  # the prompt's own token logprobs too (with logprobs)


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (temperature 1) and the top alternatives."""

    token: str
    logprob: float | None
    top: dict[str, float] | None
    id: int | None = None  # the token's id (None: not known)


@dataclass
class Delta:
    """New text of one choice (and the tokens it came from, for logprobs)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finish:
    """One choice ended: ``stop`` (end-of-text or a stop string) or ``length``."""

    index: int
    reason: str
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None


class Job:
    """One choice of one request: the prompt's ids, its settings, where its events go.

    ``cancel()`` (a client gone) frees its row at the next step.
    """

    def __init__(
        self,
        ids: list[int],
        sampling: Sampling,
        emit: Callable[[Delta | Finish], None],
        index: int = 0,
    ) -> None:
        self.ids = ids
        self.sampling = sampling
        self.index = index
        self._emit = emit
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Delta | Finish) -> None:
        self._emit(event)


def async_emitter(events: asyncio.Queue[Any]) -> Callable[[Any], None]:
    """An emit function that puts events into ``events`` from the engine's thread."""
    loop = asyncio.get_running_loop()

    def emit(event: Any) -> None:
        # a closed loop (the server stopped) has nobody listening
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(events.put_nowait, event)

    return emit


class _Call:
    """A function to run on the engine's thread (between decode steps), and its result."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: Future[Any] = Future()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():  # its caller gave up waiting
            return
        try:
            result = self.fn()
        except BaseException as e:  # the caller's to report, not the engine's
            self.future.set_exception(e)
        else:
            self.future.set_result(result)

    def refuse(self) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(RuntimeError("the server is shutting down"))


class _Row:
    """A job in the running batch: its tokens, its text so far, its stopping state."""

    def __init__(self, job: Job, budget: int, tokenizer: Tokenizer, device: torch.device) -> None:
        self.job = job
        self.budget = budget  # tokens it may still sample in all
        self.generated: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer, context=job.ids)
        self.text = ""
        self.sent = 0  # characters of text already emitted
        self.pending_logprobs: list[TokenLogprob] = []
        self.generator: torch.Generator | None = None
        if job.sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(job.sampling.seed)
        self.hold = max((len(s) for s in job.sampling.stop), default=0)
        self.reason: str | None = None  # why it ended, once it has
        self.prompt_logprobs: list[TokenLogprob] | None = None  # with echo and logprobs


class Engine:
    """The model, its tokenizer and the batching thread; :meth:`submit` queues a job."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        # a sliding window drops cached tokens, which rows cannot be regrouped around
        self.max_batch = 1 if model.config.sliding_window is not None else max_batch
        self._queue: queue.Queue[Job | _Call | None] = queue.Queue()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._pad = torch.zeros(0, dtype=torch.long, device=self.device)
        self._last = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-serve-engine", daemon=True)
        self.steps = 0  # decode steps run (for tests and /health)

    @property
    def running(self) -> int:
        """Rows in the batch now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Jobs queued, not yet admitted."""
        return self._queue.qsize()

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the thread; jobs still running end with finish reason ``abort``."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def budget(self, prompt_tokens: int, max_tokens: int) -> int:
        """Tokens a prompt may sample: max_tokens, or fewer where the context ends (the last
        sampled token need not be run, so a full context still samples one)."""
        return max(0, min(max_tokens, self.block_size + 1 - prompt_tokens))

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise RuntimeError("the server is shutting down")
        self._queue.put(job)

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn()`` on the engine's thread, between two decode steps (in the queue's
        order, like a request), and give its result or exception through the future.

        The model's other users (the inspect view) go through here: one thread owns it."""
        if self._stopping.is_set():
            raise RuntimeError("the server is shutting down")
        work = _Call(fn)
        self._queue.put(work)
        return work.future

    # the engine's thread ---------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._admit(block=not self._rows)
                    if self._rows:
                        self._step()
                except Exception:  # a bug must not leave clients hanging: end every row
                    log.exception("the batching engine failed; ending the running requests")
                    for row in self._rows:
                        self._finish(row, "abort")
                    self._reset_batch()
            for row in self._rows:
                self._finish(row, "abort")
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if isinstance(job, _Call):
                    job.refuse()
                elif job is not None:
                    job.emit(Finish(job.index, "abort", len(job.ids), 0))

    def _admit(self, block: bool) -> None:
        """Prefill waiting jobs into the batch while it has room."""
        while len(self._rows) < self.max_batch:
            try:
                job = self._queue.get(block=block)
            except queue.Empty:
                return
            block = False
            if isinstance(job, _Call):
                if self._stopping.is_set():
                    job.refuse()
                    return
                job.run()
                continue
            if job is None or self._stopping.is_set():
                if job is not None:
                    job.emit(Finish(job.index, "abort", len(job.ids), 0))
                return
            if job.cancelled.is_set():
                continue
            self._prefill(job)

    def _prefill(self, job: Job) -> None:
        s = job.sampling
        row = _Row(job, self.budget(len(job.ids), s.max_tokens), self.tokenizer, self.device)
        idx = torch.tensor([job.ids], dtype=torch.long, device=self.device)
        cache = KVCache(self.model.config.n_layer, None, self.block_size)
        echo = s.echo and s.logprobs is not None
        logits, _ = self.model(idx, cache=cache, last_only=not echo)
        prompt_logprobs = self._prompt_logprobs(job.ids, logits[0], s.logprobs) if echo else None
        if row.budget == 0:
            self._finish(row, "length", prompt_logprobs)
            return
        if self._take(row, logits[:, -1, :]):
            self._finish(row, row.reason or "stop", prompt_logprobs)
            return
        row.prompt_logprobs = prompt_logprobs
        self._join(row, cache)

    def _join(self, row: _Row, cache: KVCache) -> None:
        """Merge a prefilled row into the batch's cache (right-aligned, padded on the left)."""
        new = cache.length
        last = torch.tensor([[row.generated[-1]]], dtype=torch.long, device=self.device)
        if self._cache is None or not self._rows:
            self._cache, self._pad, self._last = cache, self._pad.new_zeros(1), last
        else:
            running = self._cache.length
            if new > running:
                self._cache.pad_front(new - running)
                self._pad = self._pad + (new - running)
            else:
                cache.pad_front(running - new)
            self._cache.append_rows(cache)
            extra = self._pad.new_full((1,), max(0, running - new))
            self._pad = torch.cat([self._pad, extra])
            self._last = torch.cat([self._last, last])
        self._rows.append(row)

    def _step(self) -> None:
        """One decode step of every row; drop the finished and the abandoned."""
        assert self._cache is not None
        # one row has no padding (regrouping drops it): the plain path, which windows take
        pad = self._pad if len(self._rows) > 1 else None
        logits, _ = self.model(self._last, cache=self._cache, last_only=True, pad=pad)
        self.steps += 1
        keep: list[int] = []
        for i, row in enumerate(self._rows):
            if row.job.cancelled.is_set():
                continue
            if self._take(row, logits[i : i + 1, -1, :]):
                self._finish(row, row.reason or "stop")
            else:
                keep.append(i)
        if len(keep) == len(self._rows):
            self._last = torch.tensor(
                [[r.generated[-1]] for r in self._rows], dtype=torch.long, device=self.device
            )
            return
        if not keep:
            self._reset_batch()
            return
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._cache.select_rows(rows)
        self._pad = self._pad.index_select(0, rows)
        common = int(self._pad.min())
        if common:
            self._cache.drop_front(common)
            self._pad = self._pad - common
        self._last = torch.tensor(
            [[r.generated[-1]] for r in self._rows], dtype=torch.long, device=self.device
        )

    def _reset_batch(self) -> None:
        self._rows, self._cache = [], None
        self._pad = self._pad.new_zeros(0)
        self._last = self._last.new_zeros((0, 1))

    def _take(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample a row's next token from its (1, V) logits and emit its text; True when the
        row is done (its reason set)."""
        s = row.job.sampling
        top_p = s.top_p if s.top_p is not None and s.top_p < 1.0 else None
        token = int(sample_next(logits, s.temperature, None, top_p, row.generator)[0, 0])
        row.generated.append(token)
        if s.logprobs is not None:
            row.pending_logprobs.append(self._token_logprob(logits[0], token, s.logprobs))
        eot = self.tokenizer.eot_id
        if token == eot:
            return self._emit_text(row, row.decoder.flush(), "stop")
        piece = row.decoder.push([token])
        if len(row.generated) >= row.budget:
            return self._emit_text(row, piece + row.decoder.flush(), "length")
        return self._emit_text(row, piece, None)

    def _emit_text(self, row: _Row, piece: str, reason: str | None) -> bool:
        """Add ``piece`` to the row's text; emit what no stop string can still claim. True
        when the row ends (``reason``, or a stop string found: ``stop``)."""
        row.text += piece
        stops = row.job.sampling.stop
        cut = min((i for i in (row.text.find(t, max(0, row.sent - len(t))) for t in stops)
                   if i >= 0), default=-1)  # fmt: skip
        if cut >= 0:
            row.text, reason = row.text[:cut], "stop"
        end = len(row.text) if reason else max(row.sent, len(row.text) - max(0, row.hold - 1))
        if end > row.sent or (row.pending_logprobs and reason):
            row.job.emit(Delta(row.job.index, row.text[row.sent : end], row.pending_logprobs))
            row.sent, row.pending_logprobs = end, []
        if reason:
            row.reason = reason
            return True
        return False

    def _finish(
        self, row: _Row, reason: str, prompt_logprobs: list[TokenLogprob] | None = None
    ) -> None:
        prompt_logprobs = prompt_logprobs or row.prompt_logprobs
        job = row.job
        job.emit(Finish(job.index, reason, len(job.ids), len(row.generated), prompt_logprobs))

    def _token_logprob(self, logits: torch.Tensor, token: int, n: int) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), dim=-1)
        return TokenLogprob(self._piece(token), float(logp[token]), self._top(logp, n), token)

    def _prompt_logprobs(self, ids: list[int], logits: torch.Tensor, n: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the ones before it (the first has none),
        as OpenAI's legacy completions give with ``echo`` and ``logprobs``."""
        logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V): row t predicts token t + 1
        out = [TokenLogprob(self._piece(ids[0]), None, None)]
        if len(ids) > 1:
            target = torch.tensor(ids[1:], device=logp.device)
            chosen = logp[:-1].gather(1, target.unsqueeze(1))[:, 0].tolist()
            for t, (tok, lp) in enumerate(zip(ids[1:], chosen, strict=True)):
                out.append(TokenLogprob(self._piece(tok), lp, self._top(logp[t], n)))
        return out

    def _top(self, logp: torch.Tensor, n: int) -> dict[str, float] | None:
        if n <= 0:
            return None
        values, tokens = torch.topk(logp, min(n, logp.size(-1)))
        return {self._piece(int(t)): float(v) for t, v in zip(tokens, values, strict=True)}

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])
