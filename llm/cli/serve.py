"""``llm serve ckpt_path=... [host=127.0.0.1 port=8000 api_key=...]``: the checkpoint behind
OpenAI's HTTP API and a chat page, until Ctrl-C or SIGTERM (which end it cleanly, exit 0)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from llm import checks
from llm.cli.app import hydra_app, load_model_source, model_source, resolve_device


def _model_name(cfg: DictConfig, key: str, value: str) -> str:
    """The name clients see: model_name=, else the run folder's name, else the file's or
    folder's own."""
    if cfg.model_name is not None:
        return str(cfg.model_name)
    path = Path(value)
    if key == "ckpt_path" and path.parent.name == "checkpoints":
        return path.parent.parent.name
    return path.stem if key == "ckpt_path" else path.name or value


def choose_template(choice: Any, lm: Any) -> str | None:
    """auto: the checkpoint's own template, else the tokenizer's chat template, else none."""
    from llm.prompts import check_template

    choice = "none" if choice is None else str(choice)
    if choice == "auto":
        if lm.template is not None:
            return str(lm.template)
        return "chat" if getattr(lm.tokenizer, "chat_template", None) else None
    return check_template(choice, tokenizer=lm.tokenizer)  # a chat template it lacks: now


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so port=0 can say which port it got."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"host={host} port={port}: cannot listen there ({e.strerror})") from e
    sock.set_inheritable(True)
    return sock


@hydra_app("serve")
def main(cfg: DictConfig) -> int:
    """Load the model, bind, serve until a signal; the signal ends it with status 0."""
    try:
        import uvicorn

        from llm.serving.app import create_app
        from llm.serving.engine import Engine
    except ImportError as e:
        raise RuntimeError(
            f"llm serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'"
        ) from e

    key, value = model_source(cfg)
    port = checks.integer("port", cfg.port, minimum=0, example=8000)
    if port > 65535:
        raise ValueError(f"port={port} is not a port: use 0-65535 (0: any free port)")
    max_batch = checks.integer("max_batch", cfg.max_batch, minimum=1, example=16)
    device = resolve_device(str(cfg.device))
    lm = load_model_source(key, value, device)
    template = choose_template(cfg.template, lm)
    name = _model_name(cfg, key, value)
    api_key = None if cfg.api_key is None else str(cfg.api_key)
    app = create_app(Engine(lm.model, lm.tokenizer, max_batch), name, template, api_key)
    host = str(cfg.host)
    sock = _listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    print(f"Serving {name} at {url} (template: {template or 'none'}; chat page: {url}/ ; "
          f"OpenAI API: {url}/v1); Ctrl-C stops", flush=True)  # fmt: skip
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, log_config=None)
    server = uvicorn.Server(config)
    # uvicorn raises the signal that stopped it again once it has shut down; with these
    # handlers in place that ends nothing, so the command exits 0 after a clean stop
    stopped: list[int] = []
    handlers = {s: signal.signal(s, lambda n, _: stopped.append(n))
                for s in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        sock.close()
    why = signal.Signals(stopped[0]).name if stopped else "shutdown"
    print(f"Stopped ({why}).", flush=True)
    return 0
