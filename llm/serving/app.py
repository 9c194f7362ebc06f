"""The HTTP side of ``llm serve``: OpenAI's routes and shapes on FastAPI, over the batching
engine (:mod:`llm.serving.engine`), plus the chat page at ``/`` and vLLM's tokenizer routes
(which lm-evaluation-harness's ``local-completions`` uses to count a context's tokens), and
``POST /inspect``, the page's look inside the model (:mod:`llm.serving.views`; not OpenAI's).

Every failure a client can cause is answered in OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``) with a 4xx status, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from llm.prompts import Message, render
from llm.serving.engine import Delta, Engine, Finish, Job, Sampling, TokenLogprob, async_emitter
from llm.serving.schemas import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    InspectRequest,
    TokenizeRequest,
)
from llm.serving.views import inspect_ids

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


class ApiError(Exception):
    """A request refused: its status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind,
        )  # fmt: skip


def error_response(error: ApiError) -> JSONResponse:
    body = {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}
    return JSONResponse({"error": body}, status_code=error.status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """pydantic's first complaint as OpenAI words it: the field and what is wrong."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(
            400,
            "We could not parse the JSON body of your request: send valid JSON "
            "(Content-Type: application/json).",
            code="invalid_json",
        )
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid request"))
    return ApiError(400, f"{param}: {message}" if param else message, param, "invalid_value")


class Server:
    """What the routes share: the engine, the model's name and template, the API key."""

    def __init__(
        self, engine: Engine, model_name: str, template: str | None, api_key: str | None
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.template = template
        self.api_key = api_key or None
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "Incorrect API key provided: send it as 'Authorization: Bearer <api_key>'.",
                code="invalid_api_key",
            )

    def encode(self, text: str, param: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text)
        except ValueError as e:
            raise ApiError(400, f"{param}: the tokenizer cannot read it: {e}", param) from e
        if not ids:  # nothing to continue: start from a document boundary
            eot = self.tokenizer.eot_id
            if eot is None:
                raise ApiError(400, f"{param} is empty and the tokenizer has no end-of-text", param)
            ids = [eot]
        return ids

    def check_vocab(self, ids: list[int], param: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"{param}: token ids must be in [0, {vocab})", param)
        return ids

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        """Ids the model can read: in the vocabulary, and no more than its context."""
        self.check_vocab(ids, param)
        block = self.engine.block_size
        if len(ids) > block:
            raise ApiError(
                400,
                f"This model's maximum context length is {block} tokens. However, your {param} "
                f"resulted in {len(ids)} tokens. Please reduce the length of the {param}.",
                param,
                "context_length_exceeded",
            )
        return ids

    async def run(
        self, prompts: list[list[int]], sampling: list[Sampling]
    ) -> tuple[list[Job], asyncio.Queue[Any]]:
        """One job per (prompt, choice), all emitting into one queue."""
        events: asyncio.Queue[Any] = asyncio.Queue()
        emit = async_emitter(events)
        pairs = zip(prompts, sampling, strict=True)
        jobs = [Job(ids, s, emit, i) for i, (ids, s) in enumerate(pairs)]
        try:
            for job in jobs:
                self.engine.submit(job)
        except RuntimeError as e:
            raise ApiError(503, str(e), kind="server_error", code="shutting_down") from e
        return jobs, events


async def _events(jobs: list[Job], events: asyncio.Queue[Any]) -> AsyncIterator[Delta | Finish]:
    """The jobs' events until each has finished; leaving early (a client gone) cancels them,
    which frees their rows in the batch."""
    done = 0
    try:
        while done < len(jobs):
            event = await events.get()
            done += isinstance(event, Finish)
            yield event
    finally:
        for job in jobs:
            job.cancel()


async def _gather(
    jobs: list[Job], events: asyncio.Queue[Any], starts: list[str]
) -> tuple[list[str], list[list[TokenLogprob]], list[Finish | None]]:
    """Each choice whole, once every job has finished: its text (from ``starts``: an echoed
    prompt, say), its sampled tokens' logprobs and its finish."""
    texts = list(starts)
    finish: list[Finish | None] = [None] * len(starts)
    entries: list[list[TokenLogprob]] = [[] for _ in starts]
    async for ev in _events(jobs, events):
        if isinstance(ev, Delta):
            texts[ev.index] += ev.text
            entries[ev.index] += ev.logprobs
        else:
            finish[ev.index] = ev
    return texts, entries, finish


def _stream_end(head: dict[str, Any], body: CompletionRequest | ChatRequest,
                prompt_tokens: int, completion_tokens: int) -> Iterator[str]:  # fmt: skip
    """A stream's last chunks: the counts when ``stream_options.include_usage``, then DONE."""
    if body.include_usage():
        yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sampling(body: CompletionRequest | ChatRequest, max_tokens: int, choice: int) -> Sampling:
    seed = None if body.seed is None else body.seed + choice
    if isinstance(body, CompletionRequest):
        logprobs, echo = body.logprobs, body.echo
    else:  # chat: a yes/no and a count of alternatives apart
        logprobs, echo = (body.top_logprobs or 0) if body.logprobs else None, False
    return Sampling(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=seed,
        stop=body.stops(),
        logprobs=logprobs,
        echo=echo,
    )


def _logprobs_object(entries: Iterable[TokenLogprob], start: int = 0) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs``: tokens, their logprobs, the top alternatives, offsets."""
    tokens, logps, tops, offsets = [], [], [], []
    at = start
    for e in entries:
        tokens.append(e.token)
        logps.append(e.logprob)
        tops.append(e.top)
        offsets.append(at)
        at += len(e.token)
    return {"tokens": tokens, "token_logprobs": logps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(entries: Iterable[TokenLogprob], eot: int | None) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: each token of the message with its logprob, UTF-8 bytes and
    alternatives (the end-of-text token ``eot`` that ended it is not in the message)."""

    def item(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**item(e.token, e.logprob), "top_logprobs": [item(*t) for t in (e.top or {}).items()]}
            for e in entries
            if eot is None or e.id != eot
        ]
    }


def create_app(
    engine: Engine, model_name: str, template: str | None = None, api_key: str | None = None
) -> FastAPI:
    """The app; it starts the engine's thread when it starts, and stops it when it stops."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="llm serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    server = Server(engine, model_name, template, api_key)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": server.model_name,
            "running": engine.running,
            "waiting": engine.waiting,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.check_key(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": server.model_name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "llm",
                    "max_model_len": engine.block_size,
                }
            ],
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        server.check_key(request)
        return await _completions(server, body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        server.check_key(request)
        return await _chat(server, body)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        server.check_key(request)
        tok = server.tokenizer
        eos = tok.decode([tok.eot_id]) if tok.eot_id is not None else None
        return {"eos_token": eos, "bos_token": None, "pad_token": None,
                "model_max_length": engine.block_size}  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
        server.check_key(request)
        try:
            tokens = server.tokenizer.encode(body.prompt)
        except ValueError as e:
            raise ApiError(400, f"prompt: the tokenizer cannot read it: {e}", "prompt") from e
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.block_size}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        server.check_key(request)
        server.check_vocab(body.tokens, "tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}

    @app.post("/inspect")
    async def inspect(body: InspectRequest, request: Request) -> dict[str, Any]:
        server.check_key(request)
        return await _inspect(server, body)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _completion_prompts(server: Server, prompt: Any) -> list[list[int]]:
    """The four shapes of ``prompt``: a text, texts, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return [server.check_ids(server.encode(prompt, "prompt"), "prompt")]
    if all(isinstance(p, int) for p in prompt):
        return [server.check_ids(list(prompt), "prompt")]
    out = []
    for p in prompt:
        ids = server.encode(p, "prompt") if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, "prompt: a list of token ids must not be empty", "prompt")
        out.append(server.check_ids(ids, "prompt"))
    return out


async def _completions(server: Server, body: CompletionRequest) -> JSONResponse | StreamingResponse:
    prompts = _completion_prompts(server, body.prompt)
    max_tokens = body.max_tokens if body.max_tokens is not None else server.engine.block_size
    n = body.n
    expanded = [ids for ids in prompts for _ in range(n)]
    sampling = [_sampling(body, max_tokens, i % n) for i in range(len(expanded))]
    jobs, events = await server.run(expanded, sampling)
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created,
            "model": server.model_name}  # fmt: skip
    prompt_tokens = sum(len(p) for p in prompts)
    echo = [server.tokenizer.decode(ids) if body.echo else "" for ids in expanded]
    want_logprobs = body.logprobs is not None

    if body.stream:

        async def stream() -> AsyncIterator[str]:
            completion_tokens = 0
            offsets = [len(e) for e in echo]
            for i, text in enumerate(echo):
                if text:
                    choice = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
                    yield _sse({**head, "choices": [choice]})
            async for ev in _events(jobs, events):
                if isinstance(ev, Delta):
                    lp = _logprobs_object(ev.logprobs, offsets[ev.index]) if want_logprobs else None
                    offsets[ev.index] += len(ev.text)
                    choice = {"index": ev.index, "text": ev.text, "logprobs": lp,
                              "finish_reason": None}  # fmt: skip
                else:
                    completion_tokens += ev.completion_tokens
                    choice = {"index": ev.index, "text": "", "logprobs": None,
                              "finish_reason": ev.reason}  # fmt: skip
                yield _sse({**head, "choices": [choice]})
            for line in _stream_end(head, body, prompt_tokens, completion_tokens):
                yield line

        return StreamingResponse(stream(), media_type="text/event-stream")

    texts, entries, finish = await _gather(jobs, events, echo)
    choices = []
    for i, fin in enumerate(finish):
        assert fin is not None
        logprobs = None
        if want_logprobs:
            own = (fin.prompt_logprobs or []) if body.echo else []
            logprobs = _logprobs_object([*own, *entries[i]])
        choices.append({"index": i, "text": texts[i], "logprobs": logprobs,
                        "finish_reason": fin.reason})  # fmt: skip
    completion_tokens = sum(f.completion_tokens for f in finish if f is not None)
    return JSONResponse(
        {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}
    )


def _rendered_ids(server: Server, chat: list[ChatMessage]) -> list[int]:
    """The conversation rendered with the checkpoint's template, as ids."""
    messages: list[Message] = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in chat
    ]
    try:
        text = render(server.template, messages, server.tokenizer)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "messages") from e
    return server.check_ids(server.encode(text, "messages"), "messages")


async def _chat(server: Server, body: ChatRequest) -> JSONResponse | StreamingResponse:
    ids = _rendered_ids(server, body.messages)
    limit = body.token_limit()
    max_tokens = limit if limit is not None else server.engine.block_size
    jobs, events = await server.run(
        [ids] * body.n, [_sampling(body, max_tokens, i) for i in range(body.n)]
    )
    eot = server.tokenizer.eot_id  # ends a reply, and is not part of its message
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "created": created, "model": server.model_name}
    prompt_tokens = len(ids)

    if body.stream:
        head["object"] = "chat.completion.chunk"

        async def stream() -> AsyncIterator[str]:
            completion_tokens = 0
            for i in range(body.n):
                delta = {"role": "assistant", "content": ""}
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                yield _sse({**head, "choices": [choice]})
            async for ev in _events(jobs, events):
                if isinstance(ev, Delta):
                    lp = _chat_logprobs(ev.logprobs, eot) if body.logprobs else None
                    if not ev.text and not (lp and lp["content"]):
                        continue
                    choice = {"index": ev.index, "delta": {"content": ev.text},
                              "logprobs": lp, "finish_reason": None}  # fmt: skip
                else:
                    completion_tokens += ev.completion_tokens
                    choice = {"index": ev.index, "delta": {}, "logprobs": None,
                              "finish_reason": ev.reason}  # fmt: skip
                yield _sse({**head, "choices": [choice]})
            for line in _stream_end(head, body, prompt_tokens, completion_tokens):
                yield line

        return StreamingResponse(stream(), media_type="text/event-stream")

    texts, entries, finish = await _gather(jobs, events, [""] * body.n)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": texts[i]},
         "logprobs": _chat_logprobs(entries[i], eot) if body.logprobs else None,
         "finish_reason": f.reason if f else "abort"}
        for i, f in enumerate(finish)
    ]  # fmt: skip
    completion_tokens = sum(f.completion_tokens for f in finish if f is not None)
    return JSONResponse(
        {**head, "object": "chat.completion", "choices": choices,
         "usage": _usage(prompt_tokens, completion_tokens)}
    )  # fmt: skip


def _inspected_ids(server: Server, body: InspectRequest) -> tuple[list[int], int]:
    """The ids to look at and how many of them are the prompt: ``prompt`` as it is, or the
    conversation rendered as the chat route renders it, followed by the reply (the last
    message, when it is the assistant's) as the tokenizer encodes its text."""
    if (body.messages is None) == (body.prompt is None):
        raise ApiError(
            400,
            "send exactly one of messages (a conversation; its last message, the assistant's, "
            "is the reply looked at) or prompt (a text)",
            "messages",
        )
    if body.prompt is not None:
        ids = server.check_ids(server.encode(body.prompt, "prompt"), "prompt")
        return ids, len(ids)
    assert body.messages is not None
    chat, reply = body.messages, ""
    if chat[-1].role == "assistant":
        chat, reply = chat[:-1], chat[-1].text()
    if not chat:
        raise ApiError(400, "messages: a reply needs the conversation before it", "messages")
    prompt = _rendered_ids(server, chat)
    try:
        answer = server.tokenizer.encode(reply)
    except ValueError as e:
        message = f"messages: the tokenizer cannot read the reply: {e}"
        raise ApiError(400, message, "messages") from e
    return prompt + answer, len(prompt)


async def _inspect(server: Server, body: InspectRequest) -> dict[str, Any]:
    """The views, computed on the engine's thread between decode steps (one thread uses the
    model); a reply that ran to the end of the context is cut to it (``cut`` tokens)."""
    ids, prompt_tokens = _inspected_ids(server, body)
    block = server.engine.block_size
    cut = max(0, len(ids) - block)
    ids = ids[:block]
    model, tok = server.engine.model, server.tokenizer
    try:
        future = server.engine.call(
            lambda: inspect_ids(model, tok, ids, body.top_k, body.last, body.attention_last)
        )
    except RuntimeError as e:
        raise ApiError(503, str(e), kind="server_error", code="shutting_down") from e
    try:
        views = await asyncio.wrap_future(future)
    except Exception as e:  # a bug in a view: still the API's error shape, logged
        if isinstance(e, RuntimeError) and "shutting down" in str(e):
            raise ApiError(503, str(e), kind="server_error", code="shutting_down") from e
        log.exception("inspect failed")
        raise ApiError(500, f"the inspect view failed: {e}", kind="server_error") from e
    return {
        "object": "inspection",
        "model": server.model_name,
        "prompt_tokens": prompt_tokens,
        "total_tokens": len(ids),
        "cut": cut,
        **views,
    }
