"""Plain helpers the tests share: small corpora, overrides for seconds-long runs, Hydra's compose
API, the ``llm`` command in a subprocess, and hand-made checkpoints and model folders."""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import pkgutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
VERDICT = DATA / "the-verdict.txt"  # public domain, 20,479 characters, shipped with the tests
SHAKESPEARE = ROOT / "data" / "tinyshakespeare" / "input.txt"  # present once downloaded
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"#-\n()"


def write_corpus(folder: Path, repeats: int = 3) -> Path:
    """``repeats`` copies of TEXT (2,440 characters each) as ``folder/corpus.txt``."""
    path = folder / "corpus.txt"
    path.write_text(TEXT * repeats, encoding="utf-8")
    return path


def tiny_overrides(tmp: Path, corpus: Path, batch_size: int = 4) -> list[str]:
    """A char-level tiny GPT on ``corpus``, with data caches and logs inside ``tmp``."""
    return [
        "model=tiny",
        "tokenizer=char",
        "data=text_files",
        f"data.path={corpus}",
        f"data.batch_size={batch_size}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"paths.data_dir={tmp / 'data'}",
        f"paths.log_dir={tmp / 'logs'}",
    ]


def fast_overrides(tmp_path: Path, steps: int, **extra: Any) -> list[str]:
    """Trainer settings for seconds-long CPU runs, outputs under tmp_path."""
    base = {
        "trainer.max_steps": steps,
        "trainer.val_check_interval": steps,
        "trainer.limit_val_batches": 2,
        "trainer.log_every_n_steps": 1,
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "callbacks.sample_text": "null",
        "callbacks.attention": "null",
        "+callbacks.loss_recorder._target_": "helpers.LossRecorder",
        "paths.data_dir": tmp_path / "data",
        "paths.log_dir": tmp_path / "logs",
        "output_dir": tmp_path / "run",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The config ``llm <config_name> <overrides>`` runs with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def run_cli(
    verb: str, *args: str, cwd: Path = ROOT, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``llm <verb> <args>`` as a user types it (``python -m llm``), offline."""
    return subprocess.run(
        [sys.executable, "-m", "llm", verb, *args],
        cwd=cwd,
        env={**ENV, **env},
        input=stdin,
        capture_output=True,
        text=True,
        # only a bound for a hung command: a 3-trial sweep took a minute on the 2-core box
        # loaded 6 deep, and twice that beside another pytest worker
        timeout=900,
    )


def start_cli(verb: str, *args: str, cwd: Path = ROOT, **env: str) -> subprocess.Popen[bytes]:
    """``llm <verb> <args>`` started as from a terminal, its stdout and stderr piped (bytes).

    Ctrl-C (SIGINT) keeps its default action in it even where these tests run with SIGINT
    ignored, as a background job of a non-interactive shell (``pytest ... &``) does: a child
    inherits an ignored signal, and Python then installs no KeyboardInterrupt handler.
    """
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:  # a handled signal is reset to its default in the new program
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "llm", verb, *args],
            cwd=cwd,
            env={**ENV, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class CliServer:
    """``llm`` commands, each in a forked child of one process that imported torch, Lightning
    and llm once: a command runs as in a process of its own (fresh Hydra state, its own
    standard streams, working folder and exit code), without the import of torch and Lightning
    every new interpreter pays (10 s on the idle 2-core machine, 25 s when it is loaded). One
    thread per command, as `-n 2` gives each test: on a shared box a tiny model's steps ran 3
    times faster so. Without ``os.fork`` (Windows) each command is a plain subprocess."""

    def __init__(self, folder: Path, **env: str) -> None:
        self.folder = folder  # where each command's stdin, stdout and stderr files go
        self.env = {**ENV, "OMP_NUM_THREADS": "1", **env}
        self.count = 0
        self.cpu_seconds = 0.0  # the commands' CPU time so far (where they were forked)
        self.proc: subprocess.Popen[str] | None = None
        if hasattr(os, "fork"):
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(DATA.parent)!r}); "
                 "import helpers; helpers.serve_cli()"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip

    def run(
        self, argv: list[str], cwd: Path, stdin: str = "", timeout: int = 900
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` (``["llm", <verb>, ...]``, or ``["python", "-c", <code>]``) run in ``cwd``."""
        if self.proc is None:
            command = [sys.executable, *(["-m", "llm"] if argv[0] == "llm" else []), *argv[1:]]
            return subprocess.run(command, cwd=cwd, env=self.env, input=stdin,
                                  capture_output=True, text=True, timeout=timeout)  # fmt: skip
        self.count += 1
        files = {k: self.folder / f"{self.count:03d}.{k}" for k in ("stdin", "stdout", "stderr")}
        files["stdin"].write_text(stdin, encoding="utf-8")
        request = {"argv": argv, "cwd": str(cwd), "timeout": timeout}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({**request, **{k: str(v) for k, v in files.items()}}))
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the llm command server ended (exit code {self.proc.wait()})")
        out, err = (
            files[k].read_text(encoding="utf-8", errors="replace") for k in ("stdout", "stderr")
        )
        reply = json.loads(answer)
        self.cpu_seconds += reply["cpu"]
        return subprocess.CompletedProcess(argv, reply["rc"], out, err)

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def serve_cli() -> None:
    """The server of :class:`CliServer`: one JSON request per line of standard input, one
    ``{"rc": ...}`` line back per command, each run in a child forked for it."""
    from hydra.core.plugins import Plugins

    import llm

    for module in ("torch", "lightning", "lightning.pytorch", "tensorboard", "matplotlib.pyplot"):
        importlib.import_module(module)
    for info in pkgutil.walk_packages(llm.__path__, "llm."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    Plugins.instance()  # Hydra's plugins (the Optuna sweeper's import of optuna): found once
    gc.freeze()  # a child's collections then leave the shared pages alone
    while line := sys.stdin.readline():
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _serve_one(request)
        _, status, usage = os.wait4(pid, 0)  # its CPU time, and its own children's
        cpu = usage.ru_utime + usage.ru_stime
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "cpu": cpu}), flush=True)


def _serve_one(request: dict[str, Any]) -> NoReturn:
    """In the forked child: the request's folder and streams, its command, then exit."""
    from llm.cli import main

    signal.alarm(int(request["timeout"]))  # a hung command dies (SIGALRM) rather than the suite
    os.chdir(request["cwd"])
    for fd, name, flags in (
        (0, "stdin", os.O_RDONLY),
        (1, "stdout", os.O_WRONLY),
        (2, "stderr", os.O_WRONLY),
    ):
        opened = os.open(request[name], flags | (os.O_CREAT | os.O_TRUNC if fd else 0), 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 (fd 0 for the process)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    argv = request["argv"]
    sys.argv = ["llm", *argv[1:]] if argv[0] == "llm" else ["-c"]
    try:
        if argv[0] == "llm":
            code = main(argv[1:])
        else:  # python -c <code>
            exec(compile(argv[2], "<README>", "exec"), {"__name__": "__main__"})
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    # a process's exit, less the interpreter's teardown (seconds: it touches every object the
    # child shares with the server)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


class LossRecorder(L.Callback):
    """Keeps every train/loss value so tests can compare the first and the last steps."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.losses.append(float(loss))


def recorder(result: dict[str, Any]) -> LossRecorder:
    return next(c for c in result["trainer"].callbacks if isinstance(c, LossRecorder))


def char_checkpoint(path: Path, block_size: int = 64, seed: int = 0, **model: Any) -> Path:
    """A randomly initialised language-model checkpoint with a char tokenizer (no training)."""
    import torch

    from llm.checkpoint import save_checkpoint
    from llm.tokenizers import CharTokenizer
    from llm.training.module import GPTLitModule

    torch.manual_seed(seed)
    tok = CharTokenizer()
    tok.fit([ALPHABET])
    module = GPTLitModule(
        model={**TINY, "block_size": block_size, "vocab_size": tok.vocab_size, **model},
        tokenizer=tok.to_dict(),
    )
    return save_checkpoint(module, path)


def hf_gpt2_dir(path: Path, n_positions: int = 64) -> Path:
    """A random GPT-2 with the real 50257-token vocab in Hugging Face's folder layout.

    Written with our exporter (tests/test_hf.py checks transformers loads it identically), which
    keeps this test free of the slow transformers import.
    """
    import torch

    from llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, block_size=n_positions, **TINY)
    GPT(cfg).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
