"""`llm serve`: padded batches equal single rows, the batching engine equals one-at-a-time
generation, the OpenAI API through the official `openai` client, errors in OpenAI's shape, a
disconnect freeing its row, the API key, the command stopping cleanly on SIGTERM, and the
inspect route (on the engine's thread, a forward pass's numbers) and the page's inspect view.

Skipped without the `serve` extra (FastAPI, uvicorn; the `dev` extra has them and `openai`).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY, char_checkpoint, start_cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from llm.model import GPT, GPTConfig, KVCache  # noqa: E402
from llm.serving.engine import Delta, Engine, Finish, Job, Sampling  # noqa: E402

ARCHITECTURES = {
    "gpt2": {},
    "llama": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1},
    "sinusoidal-manual": {"pos_encoding": "sinusoidal", "attn_impl": "manual"},
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_padded_batch_equals_each_row_alone(arch: str) -> None:
    """Rows of 5 and 9 tokens, the first padded on the left: the same logits as each alone,
    through a prefill, a decode step, and after the batch is regrouped (rows dropped, padding
    trimmed)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=32, **{**TINY, **ARCHITECTURES[arch]})
    model = GPT(config).eval()
    a, b = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        idx = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
        pad = torch.tensor([4, 0])
        cache = KVCache(config.n_layer, None, config.block_size)
        logits, _ = model(idx, cache=cache, pad=pad)
        torch.testing.assert_close(logits[0, 4:], model(a)[0][0])
        torch.testing.assert_close(logits[1], model(b)[0][0])
        nxt = torch.randint(0, 50, (2, 1))
        step, _ = model(nxt, cache=cache, pad=pad)
        torch.testing.assert_close(step[0, -1], model(torch.cat([a, nxt[:1]], 1))[0][0, -1])
        torch.testing.assert_close(step[1, -1], model(torch.cat([b, nxt[1:]], 1))[0][0, -1])
        cache.select_rows(torch.tensor([0]))
        cache.drop_front(4)
        last = torch.randint(0, 50, (1, 1))
        alone, _ = model(last, cache=cache, pad=torch.tensor([0]))
        whole = model(torch.cat([a, nxt[:1], last], 1))[0][0, -1]
        torch.testing.assert_close(alone[0, -1], whole)


class Collect:
    """A job's events, gathered synchronously (the engine's thread calls it)."""

    def __init__(self) -> None:
        self.text, self.finish, self.done = "", None, threading.Event()

    def __call__(self, event: Delta | Finish) -> None:
        if isinstance(event, Delta):
            self.text += event.text
        else:
            self.finish = event
            self.done.set()


def _run_jobs(engine: Engine, jobs: list[tuple[list[int], Sampling]]) -> list[Collect]:
    out = [Collect() for _ in jobs]
    for (ids, sampling), sink in zip(jobs, out, strict=True):
        engine.submit(Job(ids, sampling, sink))
    for sink in out:
        assert sink.done.wait(60)
    return out


def test_the_engine_batches_and_each_row_equals_its_generation_alone(
    tiny_gpt: Any, char_tokenizer: Any
) -> None:
    """Prompts of different lengths submitted together: greedy rows give model.generate's
    text, seeded rows the same text as when served alone, and they shared decode steps."""
    tok = char_tokenizer
    prompts = ["Before we", "hear me speak", "A", "All: Speak, speak", "You are all"]
    engine = Engine(tiny_gpt, tok, max_batch=8).start()
    try:
        jobs = [(tok.encode(p), Sampling(12, temperature=0.0)) for p in prompts]
        greedy = _run_jobs(engine, jobs)
        steps = engine.steps
        for prompt, sink in zip(prompts, greedy, strict=True):
            ids = tok.encode(prompt)
            want = tiny_gpt.generate(torch.tensor([ids]), 12, temperature=0.0)[0, len(ids) :]
            assert sink.text == tok.decode(want.tolist())
            assert sink.finish.reason == "length" and sink.finish.completion_tokens == 12
        assert steps < 5 * 11  # one step per row per token would be 55: rows shared steps
        seeded = [(tok.encode(p), Sampling(10, temperature=0.9, seed=7 + i)) for i, p in
                  enumerate(prompts)]  # fmt: skip
        together = _run_jobs(engine, seeded)
        alone = [_run_jobs(engine, [job])[0] for job in seeded]
        assert [s.text for s in together] == [s.text for s in alone]
        # a stop string ends a row before it, the text up to it kept
        cut = greedy[1].text[4:6]
        [stopped] = _run_jobs(engine, [(tok.encode(prompts[1]), Sampling(12, 0.0, stop=[cut]))])
        assert stopped.text == greedy[1].text[: greedy[1].text.index(cut)]
        assert stopped.finish.reason == "stop"
        # the context ends a row: a prompt of block_size tokens samples one token
        full = tok.encode(("Before we proceed any further " * 2)[: tiny_gpt.config.block_size])
        [last] = _run_jobs(engine, [(full, Sampling(5, 0.0))])
        assert last.finish.completion_tokens == 1 and last.finish.reason == "length"
    finally:
        engine.stop()
    assert engine.running == 0


def test_a_sliding_window_model_is_served_one_row_at_a_time(char_tokenizer: Any) -> None:
    """Its cache cannot be regrouped, so rows take turns; each still equals generate's."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=char_tokenizer.vocab_size, block_size=32, sliding_window=8,
                       **TINY)  # fmt: skip
    model = GPT(config).eval()
    engine = Engine(model, char_tokenizer, max_batch=8).start()
    try:
        assert engine.max_batch == 1
        prompts = [char_tokenizer.encode(p) for p in ("Before we proceed", "hear")]
        sinks = _run_jobs(engine, [(ids, Sampling(12, temperature=0.0)) for ids in prompts])
    finally:
        engine.stop()
    for ids, sink in zip(prompts, sinks, strict=True):
        want = model.generate(torch.tensor([ids]), 12, temperature=0.0)[0, len(ids) :]
        assert sink.text == char_tokenizer.decode(want.tolist())  # past the window of 8


def test_engine_call_runs_on_the_engines_thread_and_is_refused_after_stop(
    tiny_gpt: Any, char_tokenizer: Any
) -> None:
    """Work handed to Engine.call runs on the thread that owns the model, its exception reaches
    the caller, and after stop a call is refused rather than left waiting."""
    engine = Engine(tiny_gpt, char_tokenizer).start()
    try:
        assert engine.call(lambda: threading.current_thread().name).result(30) == (
            "llm-serve-engine"
        )
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0).result(30)
        [sink] = _run_jobs(engine, [(char_tokenizer.encode("Hi"), Sampling(3, 0.0))])
        assert sink.finish.completion_tokens == 3  # the engine lives on after a failed call
    finally:
        engine.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.call(lambda: None)


# --- the HTTP server -------------------------------------------------------------------------


class ThreadServer:
    """``create_app`` under uvicorn in a thread of this process, on a free port."""

    def __init__(self, ckpt: Path, api_key: str | None = None, init: bool = False) -> None:
        import uvicorn

        from llm.checkpoint import load_language_model
        from llm.cli.serve import choose_template
        from llm.initial_weights import init_language_model
        from llm.serving.app import create_app

        lm = init_language_model(ckpt) if init else load_language_model(ckpt)
        self.engine = Engine(lm.model, lm.tokenizer, max_batch=8)
        self.tokenizer = lm.tokenizer
        self.template = choose_template("auto", lm)
        app = create_app(self.engine, "tiny", self.template, api_key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:  # uvicorn's own flag: listening, lifespan done
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return char_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.ckpt", block_size=64)


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[ThreadServer]:
    with ThreadServer(ckpt) as running:
        yield running


def test_the_openai_client_chats_and_completes(server: ThreadServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len("Hello there")  # a base model: the text itself
    assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text and len([c for c in chunks if c.choices]) >= 3  # several pieces
    assert chunks[-1].usage.completion_tokens == 10
    # the legacy completion: n seeded choices, each reproducible
    done = client.completions.create(model="tiny", prompt="To be", max_tokens=8, n=2, seed=3)
    assert [c.index for c in done.choices] == [0, 1] and done.usage.completion_tokens == 16
    again = client.completions.create(model="tiny", prompt="To be", max_tokens=8, n=2, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in done.choices]
    parts = client.completions.create(model="tiny", prompt="To be", max_tokens=8, seed=3,
                                      stream=True)  # fmt: skip
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text


def test_echo_and_logprobs_score_the_prompt_as_a_forward_pass(server: ThreadServer) -> None:
    from llm.checkpoint import load_language_model

    tok = server.tokenizer
    ids = tok.encode("First Citizen")
    reply = httpx.post(f"{server.url}/v1/completions", json={
        "prompt": [ids], "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1,
    }).json()  # fmt: skip
    lp = reply["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 1
    model = server.engine.model
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)
    want = [float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-5)
    greedy = int(logp[-1].argmax())  # temperature 0: the top alternative is the token taken
    assert lp["tokens"][-1] == tok.decode([greedy])
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    assert reply["choices"][0]["text"] == tok.decode([*ids, greedy])
    del load_language_model


def test_chat_logprobs_are_the_sampled_tokens_own(server: ThreadServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "First Citizen"}]
    kwargs = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0,
              "logprobs": True, "top_logprobs": 3}  # fmt: skip
    choice = client.chat.completions.create(**kwargs).choices[0]
    content = choice.logprobs.content
    assert len(content) == 6 and "".join(c.token for c in content) == choice.message.content
    ids = server.tokenizer.encode("First Citizen")  # a base model: the text itself
    with torch.no_grad():
        logp = torch.log_softmax(server.engine.model(torch.tensor([ids]))[0][0, -1].float(), -1)
    first = content[0]
    assert first.token == server.tokenizer.decode([int(logp.argmax())])
    assert first.logprob == pytest.approx(float(logp.max()), abs=1e-5)
    assert first.bytes == list(first.token.encode("utf-8"))
    for c in content:  # greedy: each token is its own first alternative, of 3 in order
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == c.logprob >= c.top_logprobs[2].logprob
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]  # fmt: skip
    assert [(t.token, t.logprob) for t in streamed] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None
    alone = httpx.post(f"{server.url}/v1/chat/completions",
                       json={"messages": messages, "top_logprobs": 2})  # fmt: skip
    assert alone.status_code == 400 and alone.json()["error"]["param"] == "top_logprobs"
    null = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"messages": messages, "max_tokens": 1, "logprobs": None})  # fmt: skip
    assert null.status_code == 200 and null.json()["choices"][0]["logprobs"] is None


def test_the_end_of_text_that_ends_a_reply_is_not_in_its_chat_logprobs() -> None:
    from llm.serving.app import _chat_logprobs
    from llm.serving.engine import TokenLogprob

    eot = 7
    taken = [
        TokenLogprob("é", -0.25, {"é": -0.25, "e": -2.0}, 3),
        TokenLogprob("<eot>", -0.5, None, eot),
    ]
    assert _chat_logprobs(taken, eot) == {"content": [{
        "token": "é", "logprob": -0.25, "bytes": [0xC3, 0xA9],
        "top_logprobs": [{"token": "é", "logprob": -0.25, "bytes": [0xC3, 0xA9]},
                         {"token": "e", "logprob": -2.0, "bytes": [0x65]}],
    }]}  # fmt: skip
    assert [c["token"] for c in _chat_logprobs(taken, None)["content"]] == ["é", "<eot>"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "Hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "Hi", "top_p": 0}, "top_p"),
        ({"prompt": "Hi", "n": 0}, "n"),
        ({"prompt": "a" * 65}, "prompt"),  # the context holds 64
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [10_000]}, "prompt"),  # not a token id of this vocabulary
        ({"prompt": "Hi", "stop": ["", "x"]}, "stop"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_bad_completions_get_openai_errors(
    server: ThreadServer, body: dict[str, Any], param: str
) -> None:
    reply = httpx.post(f"{server.url}/v1/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


def test_other_bad_requests_get_openai_errors(server: ThreadServer) -> None:
    url = f"{server.url}/v1/chat/completions"
    json_type = {"content-type": "application/json"}
    broken = httpx.post(url, content=b'{"messages": [', headers=json_type)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    for messages in ([], [{"role": "assistant", "content": "no user turn"}], [{"role": "x"}]):
        reply = httpx.post(url, json={"messages": messages})
        assert reply.status_code == 400 and reply.json()["error"]["param"].startswith("messages")
    long = httpx.post(url, json={"messages": [{"role": "user", "content": "b" * 80}]})
    assert long.json()["error"]["code"] == "context_length_exceeded"
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # fields OpenAI has and we do not use are ignored, as OpenAI ignores unknown ones
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "frequency_penalty": 0.5, "user": "me", "no_such_field": 1}  # fmt: skip
    fine = httpx.post(url, json=body)
    assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # still alive


def test_a_client_that_disconnects_mid_stream_frees_its_row(tmp_path: Path) -> None:
    """A long reply (a context of 1024, 1000 tokens asked): the client reads two chunks and
    hangs up; the row leaves the batch long before its 1000 tokens."""
    ckpt = char_checkpoint(tmp_path / "long.ckpt", block_size=1024)
    with ThreadServer(ckpt) as running:
        body = {"prompt": "Hello", "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body) as reply:
            lines = reply.iter_lines()
            got = [next(lines) for _ in range(3)]  # data, blank, data
            assert got[0].startswith("data: ") and running.engine.running == 1
        deadline = time.monotonic() + 30
        while running.engine.running:
            assert time.monotonic() < deadline, "the row was never freed"
            time.sleep(0.01)
        assert running.engine.steps < 900  # dropped, not run to its end
        assert httpx.get(f"{running.url}/health").json()["running"] == 0


def test_an_api_key_is_required_when_set(ckpt: Path) -> None:
    openai = pytest.importorskip("openai")
    with ThreadServer(ckpt, api_key="sesame") as running:
        denied = httpx.get(f"{running.url}/v1/models")
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(f"{running.url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert httpx.get(f"{running.url}/health").status_code == 200  # health stays open
        assert httpx.post(f"{running.url}/inspect", json={"prompt": "Hi"}).status_code == 401
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="sesame")
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="x").models.list()


def test_a_hugging_face_folder_chats_in_its_own_template(tmp_path: Path) -> None:
    """init=<Qwen3 folder>: the chat endpoint renders the folder's chat template, and a reply
    ends at the folder's end-of-turn token (its eos, <|im_end|>), never shown."""
    from test_finetune_hf_chat import qwen3_folder

    with ThreadServer(qwen3_folder(tmp_path / "qwen3"), init=True) as running:
        assert running.template == "chat"
        tok = running.tokenizer
        rendered = "<|im_start|>user\nhello there<|im_end|>\n"
        body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 40,
                "temperature": 0}  # fmt: skip
        reply = httpx.post(f"{running.url}/v1/chat/completions", json=body).json()
        assert reply["usage"]["prompt_tokens"] == len(tok.encode(rendered))
        ids = tok.encode(rendered)
        want = running.engine.model.generate(
            torch.tensor([ids]), 40, temperature=0.0, stop_token=tok.eot_id
        )[0, len(ids) :].tolist()
        ended = tok.eot_id in want
        want = want[: want.index(tok.eot_id)] if ended else want
        assert reply["choices"][0]["message"]["content"] == tok.decode(want)
        assert reply["choices"][0]["finish_reason"] == ("stop" if ended else "length")


def test_the_page_ships_and_fetches_nothing_from_elsewhere(server: ThreadServer) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        text = httpx.get(f"{server.url}{asset}").text
        assert "http://" not in text and "https://" not in text  # no CDN: works offline
    assert "https://" not in page.text and 'id="inspect"' in page.text


def _inspect(server: ThreadServer, **body: Any) -> dict[str, Any]:
    reply = httpx.post(f"{server.url}/inspect", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_inspect_gives_the_last_exchanges_views_as_a_forward_pass(server: ThreadServer) -> None:
    """POST /inspect on a conversation and its reply: the ids are the chat route's rendered
    prompt then the reply; the next-token probabilities are a plain forward pass's; the lens's
    last row is the next-token view's top token; attention has every head, rows summing to 1;
    ``last`` and ``attention_last`` keep the last positions of the same numbers."""
    from llm.prompts import render

    tok, model = server.tokenizer, server.engine.model
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": " friend"}]
    body = _inspect(server, messages=messages, top_k=3)
    prompt = tok.encode(render(server.template, messages[:1], tok))
    ids = prompt + tok.encode(" friend")
    assert body["ids"] == ids and body["prompt_tokens"] == len(prompt) and body["offset"] == 0
    assert body["tokens"] == [tok.decode([i]) for i in ids] and body["cut"] == 0
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids]))[0][0].float(), -1)
    positions = body["next_token"]["positions"]
    assert len(positions) == len(ids)
    for t, entry in enumerate(positions):
        best = probs[t].topk(3)
        assert [e["id"] for e in entry["top"]] == best.indices.tolist()
        assert [e["prob"] for e in entry["top"]] == pytest.approx(best.values.tolist(), abs=1e-5)
        if t + 1 < len(ids):
            assert entry["next"]["prob"] == pytest.approx(float(probs[t, ids[t + 1]]), abs=1e-5)
    lens = body["lens"]
    n_layer, n_head = model.config.n_layer, model.config.n_head
    assert len(lens["points"]) == len(lens["top"]) == n_layer + 1
    assert all(len(row) == len(ids) for row in lens["top"])
    assert [e["id"] for e in lens["top"][-1]] == [p["top"][0]["id"] for p in positions]
    assert [e["prob"] for e in lens["top"][-1]] == [p["top"][0]["prob"] for p in positions]
    maps = torch.tensor(body["attention"]["maps"])
    assert maps.shape == (n_layer, n_head, len(ids), len(ids))
    torch.testing.assert_close(maps.sum(-1), torch.ones(n_layer, n_head, len(ids)), atol=1e-4,
                               rtol=0)  # fmt: skip
    small = _inspect(server, messages=messages, top_k=3, last=4, attention_last=3)
    assert small["offset"] == len(ids) - 4 and small["tokens"] == body["tokens"][-4:]
    assert small["next_token"]["positions"] == positions[-4:]
    assert small["lens"]["top"] == [row[-4:] for row in lens["top"]]
    assert small["attention"]["offset"] == len(ids) - 3
    torch.testing.assert_close(torch.tensor(small["attention"]["maps"]), maps[..., -3:, -3:])
    assert _inspect(server, prompt="Hello", attention_last=0)["attention"] is None
    text = _inspect(server, prompt="Hello friend", top_k=3)
    assert text["ids"] == tok.encode("Hello friend") == ids  # a base model: the text itself
    assert text["next_token"] == body["next_token"]


def test_inspect_runs_between_decode_steps_without_disturbing_a_stream(
    server: ThreadServer,
) -> None:
    """An inspection sent while a reply streams is served on the engine's thread between two
    steps: the stream still gives the greedy text it gives alone."""
    body = {"prompt": "Hi", "max_tokens": 50, "temperature": 0}
    alone = httpx.post(f"{server.url}/v1/completions", json=body).json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                break
        assert _inspect(server, prompt="Hello there")["total_tokens"] == len("Hello there")
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == alone


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "assistant", "content": "a reply alone"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "b" * 80}]}, "messages"),
        ({"prompt": "a" * 65}, "prompt"),
        ({"prompt": "Hi", "top_k": 0}, "top_k"),
        ({"prompt": "Hi", "last": 0}, "last"),
        ({"prompt": "Hi", "attention_last": 1000}, "attention_last"),
    ],
)
def test_bad_inspections_get_openai_errors(
    server: ThreadServer, body: dict[str, Any], param: str
) -> None:
    reply = httpx.post(f"{server.url}/inspect", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"].startswith(param) and error["type"] == "invalid_request_error"


def test_inspect_cuts_a_reply_at_the_end_of_the_context(server: ThreadServer) -> None:
    """A reply that ran to the end of the context (64 tokens here): its tokens past it go."""
    messages = [{"role": "user", "content": "a" * 60}, {"role": "assistant", "content": "b" * 10}]
    body = _inspect(server, messages=messages, attention_last=0)
    assert body["total_tokens"] == 64 and body["cut"] == 6 and body["prompt_tokens"] == 60
    assert len(body["next_token"]["positions"]) == 64


def test_llm_serve_stops_cleanly_on_sigterm(ckpt: Path) -> None:
    """The command as users run it: port=0 picks a free port (printed), /health answers,
    SIGTERM ends it with status 0 and no traceback."""
    proc = start_cli("serve", f"ckpt_path={ckpt}", "port=0")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("Serving tiny at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "no /health"
                time.sleep(0.05)
        assert health.json() == {"status": "ok", "model": "tiny", "running": 0, "waiting": 0}
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert json.loads(reply.text)["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"Stopped (SIGTERM)." in out


def test_llm_serve_refuses_bad_settings_before_serving(
    ckpt: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    assert llm_main("serve") != 0
    assert "set exactly one of ckpt_path=" in capsys.readouterr().err
    assert llm_main("serve", f"ckpt_path={ckpt}", "template=chat") != 0
    assert "template=chat needs a tokenizer with a chat template" in capsys.readouterr().err
    assert llm_main("serve", f"ckpt_path={ckpt}", "port=70000") != 0
    assert "port=70000 is not a port" in capsys.readouterr().err
    with socket.socket() as taken:  # a port another program listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert llm_main("serve", f"ckpt_path={ckpt}", f"port={port}") != 0
    assert f"host=127.0.0.1 port={port}: cannot listen there" in capsys.readouterr().err


def test_lm_eval_local_completions_over_http_scores_as_the_in_process_adapter(
    server: ThreadServer, tmp_path: Path
) -> None:
    """lm-evaluation-harness's `local-completions` model (echo + logprobs over HTTP, our
    /tokenize for its token counts) on a local multiple-choice task: the same accuracy and the
    same per-choice log-likelihoods as the in-process adapter `llm evaluate` uses."""
    pytest.importorskip("lm_eval")
    for needed in ("aiohttp", "tenacity", "requests"):  # lm-eval[api], which the eval extra has
        pytest.importorskip(needed)
    from lm_eval import simple_evaluate
    from test_harness import write_tasks

    from llm.evaluation.harness import HarnessLM, evaluate_harness, task_manager

    tasks = write_tasks(tmp_path / "tasks")
    local = evaluate_harness(
        HarnessLM(server.engine.model, server.tokenizer, batch_size=4),
        ["tiny_mc"], include_path=str(tasks), bootstrap_iters=0,
    )  # fmt: skip
    remote = simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{server.url}/v1/completions",
            "model": "tiny",
            "tokenizer_backend": "remote",
            "max_length": 64,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["tiny_mc"],
        task_manager=task_manager(["tiny_mc"], str(tasks)),
        bootstrap_iters=0,
        log_samples=True,
    )
    assert remote is not None
    ours, theirs = local["results"]["tiny_mc"], remote["results"]["tiny_mc"]
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs[metric] == ours[metric]
    # the numbers behind them: each choice's log-likelihood, as a plain forward pass gives
    model, tok = server.engine.model, server.tokenizer
    for sample in remote["samples"]["tiny_mc"]:
        for (ctx, cont), [(logprob, _)] in zip(sample["arguments"], sample["resps"], strict=True):
            ids, cids = tok.encode(ctx), tok.encode(cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids + cids]))[0][0].float(), -1)
            want = sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(cids))
            assert float(logprob) == pytest.approx(want, abs=1e-4)


def _browser() -> Any:
    """Playwright's Chromium (the system one where installed), or a skip saying what lacks."""
    pytest.importorskip("playwright", reason="the browser test needs Playwright (docs extra)")
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("shoot", ROOT / "scripts/screenshot_serve.py")
    assert spec and spec.loader
    script: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    executable = script.shots.find_browser(None)
    if executable is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium) for the browser test")
    return script, executable


def test_the_page_chats_in_a_real_browser(server: ThreadServer) -> None:
    """Headless Chromium types a message on the page; the reply streams in (several pieces),
    equals what the API gives for the same settings; Inspect shows the exchange's next-token
    table (a row per token), logit lens (a row per layer, a cell per token) and attention map;
    and Reset clears the conversation."""
    script, executable = _browser()
    with script.shots.browser(executable) as chromium:
        page = chromium.new_page()
        page.set_default_timeout(30_000)
        page.goto(server.url)
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        page.fill("#max_tokens", "12")
        page.fill("#seed", "5")
        page.evaluate(script.COUNT_PIECES)
        reply = script.chat(page, "Hello")
        assert page.evaluate("window.__pieces") >= 4  # the bubble, then piece after piece
        assert "finish_reason: length" in page.inner_text("#status")
        api = httpx.post(f"{server.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "seed": 5,
            "temperature": 0.8, "top_p": 1.0,
        }).json()  # fmt: skip
        assert reply == api["choices"][0]["message"]["content"]
        # the inspect view of that exchange: its tables and a map per layer and head
        assert page.is_disabled("#inspect-button") is False
        tokens = len(server.tokenizer.encode("Hello" + reply))
        view = script.inspect(page)
        n_layer, n_head = (server.engine.model.config.n_layer, server.engine.model.config.n_head)
        assert view["next_rows"] == tokens and view["lens_rows"] == n_layer + 1
        assert view["lens_cells"] == [tokens + 1] * (n_layer + 1)  # a name, then each token
        assert view["canvas"] == [tokens * 12] * 2 and view["heads"] == [n_layer, n_head]
        assert view["painted"]  # the map was drawn: its pixels are not all blank
        assert f"the reply from token {len('Hello')}" in page.inner_text("#inspect-status")
        second = script.chat(page, "Again")
        assert page.locator("#messages li").count() == 4 and isinstance(second, str)
        for turn in ("Three", "Four", "Five"):  # past the context of 64: earliest turns go
            script.chat(page, turn)
        assert page.locator("#messages li.error").count() == 0
        assert "earliest turns dropped" in page.inner_text("#status")
        page.click("#reset")
        assert page.locator("#messages li").count() == 0
        assert page.is_disabled("#inspect-button") and page.is_hidden("#inspect-body")
        assert page.inner_text("#status") == "new conversation"
