"""scripts/screenshots.py: its commands, its experiment file, its waits on TensorBoard, and
(slow, where Playwright and a Chromium are installed) the run's three screenshots."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, compose, run_cli, tiny_overrides, write_corpus

_spec = importlib.util.spec_from_file_location("screenshots", ROOT / "scripts" / "screenshots.py")
assert _spec and _spec.loader
shots: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shots)


def test_arguments_default_to_the_readme_images_and_refuse_bad_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = shots.parse_args([])
    assert (args.out, args.steps, args.sweep_steps, args.run, args.only) == (
        ROOT / "docs" / "img",
        300,
        150,
        None,
        None,
    )
    with pytest.raises(SystemExit):
        shots.parse_args(["--sweep-steps", "0"])
    assert "--sweep-steps must be at least 1" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit):
        shots.parse_args(["--run", str(missing)])
    assert f"--run {missing}: no such file or folder" in capsys.readouterr().err


def test_train_commands_name_the_experiment_and_the_grid(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    run = shots.train_command(tmp_path / "conf", tmp_path / "logs", corpus)
    assert run[2:] == [
        "llm",
        "train",
        "experiment=tiny_shakespeare",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"data.path={corpus}",
    ]
    sweep = shots.train_command(tmp_path / "conf", tmp_path / "logs", None, shots.SWEEP)
    assert sweep[2:7] == [
        "llm",
        "train",
        "-m",
        "experiment=tiny_shakespeare",
        "model.norm=layernorm,rmsnorm",
    ]
    assert "optim.lr=1e-3,3e-3" in sweep
    assert not any(arg.startswith("data.path=") for arg in sweep)  # llm train's own download


def test_the_experiment_file_composes_into_the_tiny_recipe(tmp_path: Path) -> None:
    shots.write_experiment(tmp_path, 120)
    cfg = compose("train", ["experiment=tiny_shakespeare", f"hydra.searchpath=[file://{tmp_path}]"])
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (120, 50)
    assert (cfg.optim.warmup_steps, cfg.trainer.limit_val_batches) == (12, 5)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.block_size) == (2, 2, 32)
    assert cfg.tokenizer._target_.endswith("CharTokenizer")


def test_swept_keys_are_those_that_differ_between_jobs(tmp_path: Path) -> None:
    jobs = [
        ["experiment=tiny_shakespeare", "model.norm=layernorm", "optim.lr=1e-3"],
        ["experiment=tiny_shakespeare", "model.norm=rmsnorm", "optim.lr=1e-3"],
        ["experiment=tiny_shakespeare", "model.norm=layernorm", "optim.lr=3e-3", "+seed=2"],
    ]
    for i, overrides in enumerate(jobs):
        folder = tmp_path / f"{i}_job" / ".hydra"
        folder.mkdir(parents=True)
        (folder / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    assert shots.swept_keys(tmp_path) == ["model.norm", "optim.lr", "seed"]


def test_stage_run_copies_only_the_event_files_under_the_run_name(tmp_path: Path) -> None:
    run = tmp_path / "2026-01-01_model=tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "events.out.tfevents.1.host.0").write_bytes(b"abc")
    (run / "train.log").write_text("log")
    logdir = shots.stage_run(run, tmp_path / "board")
    assert sorted(p.relative_to(logdir).as_posix() for p in logdir.rglob("*")) == [
        "2026-01-01_model=tiny",
        "2026-01-01_model=tiny/events.out.tfevents.1.host.0",
    ]
    with pytest.raises(RuntimeError, match="no TensorBoard event files"):
        shots.stage_run(run / "checkpoints", tmp_path / "other")


@pytest.fixture
def board() -> Iterator[tuple[str, dict[str, Any]]]:
    """A stand-in TensorBoard: /data/runs and /data/plugin/scalars/tags from ``state``, whose
    "finished" run only gets its end tag on the third tags request (still reading)."""
    state: dict[str, Any] = {"tag_requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/data/runs":
                body: Any = ["a", "b"]
            elif self.path == "/data/plugin/scalars/tags":
                state["tag_requests"] += 1
                done = state["tag_requests"] >= 3
                end = {shots.END_TAG: {}} if done else {}
                body = {"a": {"train/loss": {}, **end}, "b": {shots.END_TAG: {}}}
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        thread.join()


def test_wait_for_runs_waits_until_every_run_was_read_to_its_end(board: Any) -> None:
    url, state = board
    assert shots.wait_for_runs(url, 2, timeout=30) == ["a", "b"]
    assert state["tag_requests"] == 3


def test_wait_for_runs_fails_on_a_dead_server_and_names_the_missing_tag(board: Any) -> None:
    url, _ = board
    with pytest.raises(RuntimeError, match="exited before it served"):
        shots.wait_for_runs(url, 2, alive=lambda: False)
    with pytest.raises(TimeoutError, match=r"3 finished runs .*whole_run/best_val_loss"):
        shots.wait_for_runs(url, 3, timeout=1)


def _playwright_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return 'Playwright is not installed (pip install -e ".[docs]")'
    if shots.find_browser(None) is None:
        return "no chromium on PATH (apt-get install chromium)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_playwright_missing() is not None, reason=str(_playwright_missing()))
def test_screenshots_of_a_run_in_headless_chromium(tmp_path: Path) -> None:
    from PIL import Image

    corpus = write_corpus(tmp_path, repeats=20)
    run = tmp_path / "2026-01-01_tiny"
    overrides = [
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "trainer.limit_val_batches=2",
        "callbacks.sample_text.max_new_tokens=40",
        f"hydra.run.dir={run}",
    ]
    proc = run_cli("train", *tiny_overrides(tmp_path, corpus), *overrides)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "img"
    args = ["--run", str(run), "--only", "run", "--out", str(out), "--work", str(tmp_path / "w")]
    assert shots.main(args) == 0
    names = ["tensorboard_run_scalars.png", "tensorboard_run_attention.png"]
    names.append("tensorboard_run_text.png")
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert Image.open(out / name).size == (1400, 900)
        assert (out / name).stat().st_size < 300_000
