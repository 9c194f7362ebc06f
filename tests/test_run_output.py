"""What a run says: its summary, its log file, plain progress lines where there is no terminal,
no noise, and sweeps whose every job validates and whose table ends the command."""

from __future__ import annotations

import itertools
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_cli, tiny_overrides, write_corpus


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *tiny_overrides(tmp_path, write_corpus(tmp_path)),
        "trainer.max_steps=6",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "callbacks.sample_text.max_new_tokens=4",
        "callbacks.progress_bar.every_n_steps=2",
        "trainer.enable_progress_bar=true",  # tiny_overrides turns it off
        *extra,
    ]


@pytest.mark.slow
def test_a_run_ends_with_its_summary_and_keeps_a_log(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    assert llm_main("train", *_args(tmp_path)) == 0
    out = capsys.readouterr().out
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    summary = out[out.index("Run folder:") :].splitlines()
    assert summary[0] == f"Run folder:      {run}"
    assert summary[1].startswith("Best val/loss:   ") and summary[1].endswith(" at step 6")
    assert summary[2].startswith("Final loss:      train ") and summary[2].endswith("(step 6)")
    assert summary[3].startswith("Throughput:      ") and summary[3].endswith(" tokens/s")
    assert summary[5] == f"Last checkpoint: {run}/checkpoints/last.ckpt"
    assert summary[6:] == [
        "Next:",
        f"  tensorboard --logdir {run.parent}",  # the run listed by its folder's name
        f"  llm generate ckpt_path={run}/checkpoints/last.ckpt",
        f"  llm evaluate ckpt_path={run}/checkpoints/last.ckpt",
    ]
    # validations before the first step and after the last, though the interval is 4
    steps = [int(line.split()[3][:-1]) for line in out.splitlines() if "validation at" in line]
    assert steps == [0, 4, 6]
    # the run's log file: what a person needs afterwards
    log = (run / "train.log").read_text()
    assert "overrides: model=tiny tokenizer=char data=text_files" in log
    assert [line.split(" - ", 1)[1] for line in log.splitlines() if "validation at" in line] == [
        line for line in out.splitlines() if "validation at" in line
    ]
    assert "Run folder:" in log and "llm generate ckpt_path=" in log
    # off a terminal, progress is a plain line every N steps: no carriage returns or escapes
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert [p.split()[1] for p in progress] == ["2/6", "4/6", "6/6"]
    assert "\r" not in out and "\x1b" not in out


@pytest.mark.slow
def test_the_next_commands_paste_back_for_a_folder_with_a_space_and_an_accent(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """The summary's `llm generate ckpt_path=...` line, split as a shell splits it, runs."""
    import shlex

    run = tmp_path / "my runs" / "été"
    args = [
        *tiny_overrides(tmp_path, write_corpus(tmp_path)),
        *("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"),
        *("~logger", "callbacks.sample_text=null", "callbacks.attention=null"),
        f"output_dir={run}",
    ]
    assert llm_main("train", *args) == 0
    out = capsys.readouterr().out.splitlines()
    generate = shlex.split(next(line for line in out if line.startswith("  llm generate ")))
    assert generate == ["llm", "generate", f"ckpt_path={run}/checkpoints/last.ckpt"]
    tensorboard = shlex.split(next(line for line in out if "tensorboard --logdir" in line))
    assert tensorboard == ["tensorboard", "--logdir", str(run.parent)]
    assert llm_main(generate[1], *generate[2:], "max_new_tokens=4", "prompt=First") == 0
    assert capsys.readouterr().out.startswith("First")


@pytest.mark.slow
def test_a_failed_run_logs_its_traceback_in_the_run_folder(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before training (an empty corpus): a short error and no run folder; with
    HYDRA_FULL_ERROR=1 the folder stays, its log holding the traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.txt").write_text("", encoding="utf-8")
    args = [*_args(tmp_path), f"data.path={empty}"]
    assert llm_main("train", *args) == 1
    err = capsys.readouterr().err
    assert "is empty: it contains no text" in err and "Traceback" not in err
    runs = tmp_path / "logs" / "train" / "runs"
    assert not runs.exists() or not list(runs.iterdir())
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="is empty: it contains no text"):
        llm_main("train", *args)
    (run,) = runs.iterdir()
    log = (run / "train.log").read_text()
    assert "[ERROR] - run failed" in log and "Traceback (most recent call last)" in log


@pytest.mark.slow
def test_a_run_says_each_thing_once_and_nothing_else(tmp_path: Path) -> None:
    """As a user's terminal would show it (a subprocess): no Lightning tips, no deprecation or
    future warnings, no module table with a FLOPs column of zeros, no line twice."""
    proc = run_cli("train", *_args(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    for noise in ("Tip", "💡", "Warning", "deprecated", "Total FLOPs", "TPU available", "| Name"):
        assert noise not in text, noise
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), [x for x in lines if lines.count(x) > 1]
    assert lines[0].startswith("llm train: ") and lines[-1].startswith("  llm evaluate ")


@pytest.mark.slow
def test_every_job_of_a_short_sweep_validates_and_the_sweep_ends_with_its_table(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """`val_check_interval` (250) beyond the run (3 steps): each job still ends validated, so
    the report ranks them by a val loss and a sweeper gets a finite objective."""
    sweep = tmp_path / "sweep"
    args = [
        *tiny_overrides(tmp_path, write_corpus(tmp_path)),
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"hydra.sweep.dir={sweep}",
    ]
    assert llm_main("train", "-m", *args, "optim.lr=1e-3,3e-3") == 0
    out = capsys.readouterr().out
    for job in ("0_", "1_"):
        (folder,) = sweep.glob(f"{job}*")
        last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 3
        score = last["callbacks"][next(k for k in last["callbacks"] if "RunCheckpoint" in k)]
        assert math.isfinite(float(score["best_model_score"]))
    table = out[out.index("# Sweep report") :]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(rows) == 2 and all("completed" in r and "no val/loss" not in r for r in rows)
    assert f"Report folder: {sweep / 'report'}" in out
    assert (sweep / "report" / "val_loss.png").is_file()
    # each job says one line (overrides, best val loss, time); the sweep ends with its best
    # job's full summary, after the table; each job's log file keeps its own summary
    jobs = [line for line in out.splitlines() if line.startswith("job ")]
    assert [j.split(" (")[0] for j in jobs] == ["job 0", "job 1"]
    assert all("optim.lr=" in j and ": best val/loss " in j and re.search(r" in \dm\d\ds$", j)
               for j in jobs)  # fmt: skip
    assert out.count("Run folder:") == 1 and out.index("Run folder:") > out.index("# Sweep report")
    best = rows[0].split("|")[2].strip()
    assert f"Best job ({best}):\nRun folder:      {sweep / best}" in out
    for job in ("0_", "1_"):
        (folder,) = sweep.glob(f"{job}*")
        assert f"Run folder:      {folder}" in (folder / "train.log").read_text()


def test_plain_progress_lines_say_step_loss_speed_and_time_left() -> None:
    from types import SimpleNamespace

    from llm.training.progress import PlainProgress

    bar = PlainProgress(every_n_steps=10)
    bar._start, bar._start_step = 0.0, 0
    bar.get_metrics = lambda trainer, module: {  # type: ignore[method-assign]
        "train/loss": 2.5,
        "val/loss": 2.75,
        "train/tokens_per_sec": 12345.6,
    }
    trainer = SimpleNamespace(max_steps=200)
    import time

    bar._start = time.perf_counter() - 5.0  # 50 steps in 5 s: 15 s for the 150 left
    line = bar.line(trainer, None, 50)  # type: ignore[arg-type]
    assert line.startswith("step 50/200 (25%)  train/loss 2.5000  val/loss 2.7500  12,346 tokens/s")
    assert line.endswith("eta 0m15s")


def test_attention_figure_is_readable() -> None:
    from llm.heatmaps import heatmap_figure, visible

    assert [visible(s) for s in [" the", "\n", "\t", "a", ""]] == ["␣the", "↵", "⇥", "a", "∅"]
    maps = torch.softmax(torch.randn(3, 5, 5), dim=-1)
    fig = heatmap_figure(maps, [" To", " be", ",", "\n", "or"], title="layer 1")
    heads = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert len(heads) == 3
    assert heads[0].get_xlabel() == "key (attended to)"
    assert heads[0].get_ylabel() == "query (attending)"
    assert [t.get_text() for t in heads[0].get_xticklabels()] == ["␣To", "␣be", ",", "↵", "or"]
    assert len(fig.axes) == 3  # no colour bar: the heading gives the scale, always 0..1
    assert fig.get_suptitle() == "layer 1 · weight 0 (dark) to 1 (yellow)"
    fig.canvas.draw()
    width, height = fig.canvas.get_width_height()
    assert width >= 3 * 180 and height >= 180  # three heads side by side, 180 px at least
    boxes = [ax.get_tightbbox() for ax in heads]
    assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(boxes))  # labels clear of the next


def test_default_heat_map_fits_an_images_card_with_readable_labels() -> None:
    """IMAGES' card fits an image to its 350 px unless "Show actual image size" is ticked: the
    default 20 tokens fit in 330 px at 12 px a token, their labels at 7 pt (9.7 px at 100 dpi),
    GPT-2 pieces cut to 6 characters, so the card shows them at full size."""
    import numpy as np
    from matplotlib.text import Text

    from llm.heatmaps import HeatmapCanvas
    from llm.training.callbacks import AttentionHeatmapCallback

    t = AttentionHeatmapCallback().max_tokens
    assert t == 20
    labels = [" Citizen", ":", "\n", "WWWWWWWWWW", *[" we"] * (t - 4)]
    canvas = HeatmapCanvas(t, labels)
    image = canvas.render(np.full((t, t), 1.0 / t), 11, 0)
    assert image.shape[1] <= 330 and image.shape[0] <= 360
    ax = canvas.axes
    assert ax.get_window_extent().width == pytest.approx(12 * t, abs=1)  # 12 px a token
    ticks = ax.get_xticklabels() + ax.get_yticklabels()
    assert [x.get_text() for x in ax.get_yticklabels()][:4] == ["␣Citi…", ":", "↵", "WWWWW…"]
    texts = [*ticks, ax.title, ax.xaxis.label, ax.yaxis.label, canvas.suptitle]
    assert all(isinstance(x, Text) and x.get_fontsize() * 100 / 72 >= 8 for x in texts)


def test_heatmap_canvas_draws_what_a_new_figure_draws() -> None:
    """The reused figure (its image, title and layer drawn over the saved rest) gives the
    image a new figure would, head after head."""
    import numpy as np

    from llm.heatmaps import HeatmapCanvas, heatmap_figure

    torch.manual_seed(0)
    labels = [" To", " be", ",", "\n", "or", " not"]
    maps = torch.softmax(torch.randn(3, 6, 6) * 3, dim=-1).numpy()
    canvas = HeatmapCanvas(6, labels)

    def fresh(head: int) -> np.ndarray:
        fig = heatmap_figure(maps[head : head + 1], labels, "layer 2", head)
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3]

    def differ(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.any(a != b, axis=-1).mean())

    drawn = [canvas.render(maps[h], 2, h) for h in range(3)]
    for head, image in enumerate(drawn):
        expected = fresh(head)
        assert image.shape == expected.shape and image.dtype == np.uint8
        assert differ(image, expected) == 0.0  # pixel for pixel, the frame drawn once
    assert differ(drawn[0], drawn[1]) > 0.05  # the heads' weights do show
    assert differ(canvas.render(maps[0], 2, 0), drawn[0]) == 0.0  # nothing left of the last


def test_background_work_is_waited_for_and_its_error_raised() -> None:
    """A job runs on the worker thread; the next hand-off and close() wait for it, and a
    failed job's error comes out on the thread that waits."""
    import threading

    from llm.training.callbacks import Background

    release, done = threading.Event(), []
    work = Background()

    def job(n: int) -> None:
        release.wait(timeout=30)
        done.append((n, threading.current_thread().name))

    work.submit(job, 1)
    assert done == []  # still waiting for release: the caller went on
    release.set()
    work.submit(job, 2)  # waits for job 1 first
    assert [n for n, _ in done] == [1]
    work.close()
    assert [n for n, _ in done] == [1, 2]
    assert all(name.startswith("llm-board") for _, name in done)

    def fails() -> None:
        raise ValueError("no figure")

    work.submit(fails)
    with pytest.raises(ValueError, match="no figure"):
        work.close()
    work.close()  # nothing left to wait for


@pytest.mark.slow
def test_step_lines_go_on_when_the_progress_bar_is_off(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    """`trainer.enable_progress_bar=false` (as experiment=shakespeare_char_cpu_speedrun sets):
    plain step lines at the bar's interval, rather than nothing until the summary."""
    from helpers import compose

    from llm.training.progress import StepLines
    from llm.training.trainer import build_trainer

    speedrun = compose(
        "train", ["experiment=shakespeare_char_cpu_speedrun", f"output_dir={tmp_path / 's'}"]
    )
    assert speedrun.trainer.enable_progress_bar is False
    trainer, _ = build_trainer(speedrun)
    (lines,) = [c for c in trainer.callbacks if isinstance(c, StepLines)]
    assert lines.every_n_steps == 50 and trainer.progress_bar_callback is None

    args = [*_args(tmp_path), "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=2"]
    assert llm_main("train", *args) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert [p.split()[1] for p in progress] == ["2/6", "4/6", "6/6"]
    assert all("train/loss " in p for p in progress), progress
    assert all(" tokens/s" in p for p in progress[1:]), progress  # from the 2nd logging step


def test_log_lines_on_a_terminal_go_through_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal, `validation at step N: ...` is written with tqdm.write (which clears the
    bar and draws it again), not printed onto the bar's line."""
    import logging
    import sys

    import tqdm

    from llm.training.progress import Bar, progress_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress_bar(refresh_rate=5, every_n_steps=7)
    assert isinstance(bar, Bar) and bar.every_n_steps == 7
    written: list[str] = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, **kw: written.append(s)))
    console = logging.StreamHandler(sys.stdout)
    root = logging.getLogger()
    root.addHandler(console)
    monkeypatch.setattr(root, "level", logging.INFO)
    try:
        bar.on_fit_start(None, None)  # type: ignore[arg-type]
        logging.getLogger("llm.training.module").info("validation at step 3: val/loss 2.5000")
        bar.teardown(None, None, "fit")  # type: ignore[arg-type]
        restored = console in root.handlers
        logging.getLogger("llm").info("after the bar")  # the plain console handler again
    finally:
        root.removeHandler(console)
    assert written == ["validation at step 3: val/loss 2.5000"] and restored


def test_a_refused_command_leaves_no_run_folder(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture, trained: dict[str, Any]
) -> None:
    """`llm train optim.lr=abc` made a run folder that `llm report` listed as failed; a failed
    resume keeps the folder it continues (its checkpoints, its log)."""
    runs = tmp_path / "logs" / "train" / "runs"
    args = [*tiny_overrides(tmp_path, write_corpus(tmp_path)), "trainer.max_steps=2"]
    assert llm_main("train", *args, "optim.lr=abc") == 1
    assert "optim.lr='abc'" in capsys.readouterr().err
    assert not runs.exists() or not list(runs.iterdir())

    run = tmp_path / "kept"  # a run folder (Hydra's .hydra/ in it) to resume in
    shutil.copytree(trained["ckpt"].parent.parent, run)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    before = sorted(p.name for p in run.iterdir())
    ckpt = run / "checkpoints" / trained["ckpt"].name
    own = [o for o in trained["overrides"] if not o.startswith("output_dir=")]
    assert llm_main("train", *own, f"ckpt_path={ckpt}", "trainer.max_steps=1") == 1
    assert "nothing left to train" in capsys.readouterr().err
    assert set(before) <= {p.name for p in run.iterdir()}
