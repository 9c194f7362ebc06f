"""What a researcher sees of a run and of a sweep: TensorBoard's layout, HPARAMS, images and text
as a TensorBoard server serves them, one learning-rate curve per optimizer, and one tokens/s
number everywhere."""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import compose, run_cli, tiny_overrides, write_corpus, write_jsonl

STEPS = 6
MC = [  # in the corpus' characters (a char tokenizer fitted on it)
    {"ctx": "First Citizen: Before we", "endings": ["proceed", "hhhh", "speak"], "label": 0},
    {"ctx": "hear me", "endings": ["speak.", "ffff.", "we."], "label": 0},
]


@contextmanager
def tensorboard(logdir: Path) -> Iterator[Any]:
    """A TensorBoard server on ``logdir`` (a free port); yields ``ask(path, body=None)``,
    which GETs, or POSTs ``body`` as JSON, and returns the decoded answer (an image's bytes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", *args, "--load_fast=false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ask(path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, headers)
        with urllib.request.urlopen(request, timeout=30) as answer:
            if answer.headers.get_content_type() != "application/json":
                return answer.read()
            return json.load(answer)

    try:
        for _ in range(240):
            try:
                if ask("/data/runs"):
                    break
            except OSError:
                pass
            time.sleep(0.25)
        yield ask
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny `llm train` through the CLI (a benchmark scored at each validation)."""
    tmp = tmp_path_factory.mktemp("screen")
    mc = write_jsonl(tmp / "mc.jsonl", MC)
    args = [
        *tiny_overrides(tmp, write_corpus(tmp)),
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=2",
        "callbacks.sample_text.max_new_tokens=4",
        f"callbacks.multiple_choice.path={mc}",
        "optim.lr=0.002",
    ]
    proc = run_cli("train", *args, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp / "logs" / "train" / "runs").iterdir()
    return {"run": run, "out": proc.stdout + proc.stderr, "args": args}


@pytest.mark.slow
def test_tensorboard_serves_the_layout_and_the_end_figures_in_hparams_only(
    cli_run: dict[str, Any],
) -> None:
    run, out = cli_run["run"], cli_run["out"]
    with tensorboard(run) as ask:
        layout = ask("/data/plugin/custom_scalars/layout")
        experiment = ask("/data/plugin/hparams/experiment", {"experimentName": ""})
        groups = ask(
            "/data/plugin/hparams/session_groups",
            {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "sliceSize": 10},
        )
    charts = {c["title"]: [ch["title"] for ch in c["chart"]] for c in layout["category"]}
    assert charts == {
        "loss": ["train and val loss"],
        "optimization": ["learning rate", "gradient norm (before clipping)"],
        "speed": ["tokens/s"],  # no train/mfu on a CPU
        "whole run": ["best val loss", "final train loss", "tokens/s (training time)",
                      "parameters"],
    }  # fmt: skip
    loss = layout["category"][0]["chart"][0]["multiline"]["tag"]
    assert loss == ["train/loss", "val/loss"]
    assert layout["category"][1]["chart"][0]["multiline"]["tag"] == ["train/lr/.*"]

    # HPARAMS: the command line's keys first (TensorBoard sorts those by name), no "None"
    infos = experiment["hparamInfos"]
    shown = [i["name"] for i in infos if i["differs"]]
    assert shown == sorted(
        ["model", "tokenizer", "data", "data.batch_size", "trainer.max_steps",
         "trainer.val_check_interval", "trainer.limit_val_batches", "optim.lr"]
    )  # fmt: skip
    assert [i["name"] for i in infos[: len(shown)]] == shown
    metrics = {m["name"]["tag"]: m["displayName"] for m in experiment["metricInfos"]}
    assert metrics == {
        "whole_run/best_val_loss": "best val loss",
        "whole_run/final_train_loss": "final train loss",
        "whole_run/tokens_per_sec": "tokens/s (training time)",
        "whole_run/params": "parameters",
        "val/mc_acc": "benchmark accuracy (last val/mc_acc)",
    }
    (group,) = groups["sessionGroups"]
    assert "None" not in group["hparams"].values() and group["hparams"]["optim.lr"] == 0.002
    values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    assert set(values) == set(metrics)  # every metric has its value in HPARAMS
    best = float(out.split("Best val/loss:")[1].split()[0])
    assert round(values["whole_run/best_val_loss"], 4) == best
    assert 0.0 <= values["val/mc_acc"] <= 1.0

    # the end figures: one point each, at the last step, under a group that sorts last
    scalars = _scalars(run)
    assert not [t for t in scalars if t.startswith("hp/")]
    ends = {t: s for t, s in scalars.items() if t.startswith("whole_run/")}
    assert set(ends) == set(metrics) - {"val/mc_acc"}
    assert all([step for step, _ in s] == [STEPS] for s in ends.values())
    assert sorted({t.split("/")[0] for t in scalars})[-1] == "whole_run"
    # one learning-rate curve per optimizer (AdamW's groups share one schedule)
    assert [t for t in scalars if "lr/" in t] == ["train/lr/adamw"]


@pytest.mark.slow
def test_time_series_opens_on_the_train_group(cli_run: dict[str, Any]) -> None:
    """TIME SERIES orders its groups (a tag's part before the first '/') by name, for scalars
    and images alike: the learning rates and the heat maps sit in the train and val groups,
    so the loss is the first group it shows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cli_run["run"]), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    (image, *_) = events.Images("val/attention/layer0/head0")
    assert image.width <= 330  # IMAGES' card shows it at full size: its labels read
    groups = sorted({t.split("/")[0] for t in [*tags["scalars"], *tags["images"]]})
    assert groups == ["train", "val", "whole_run"]


@pytest.mark.slow
def test_tokens_per_sec_is_one_number_in_summary_log_hparams_and_report(
    cli_run: dict[str, Any], llm_main: Any, capsys: pytest.CaptureFixture
) -> None:
    run, out = cli_run["run"], cli_run["out"]
    summary = out.split("Throughput:")[1].split()[0]
    log = (run / "train.log").read_text(encoding="utf-8")
    assert log.split("Throughput:")[1].split()[0] == summary
    (hparams_value,) = [v for _, v in _scalars(run)["whole_run/tokens_per_sec"]]
    assert f"{hparams_value:,.0f}" == summary
    report = run.parent / "report"
    assert llm_main("report", f"dir={run}", f"out={report}") == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| 1 |"))
    cells = [c.strip() for c in row.split("|")]
    header = next(line for line in printed.splitlines() if line.startswith("| rank"))
    assert cells[[c.strip() for c in header.split("|")].index("tokens_per_sec")] == summary
    with (report / "report.csv").open(encoding="utf-8") as f:
        (csv_row,) = csv.DictReader(f)
    assert f"{float(csv_row['tokens_per_sec']):,.0f}" == summary


@pytest.mark.slow
def test_one_learning_rate_curve_per_optimizer_under_muon(tmp_path: Path) -> None:
    from llm.cli.train import train

    args = [
        *tiny_overrides(tmp_path, write_corpus(tmp_path)),
        "optim=muon",
        "optim.warmup_steps=0",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"output_dir={tmp_path / 'run'}",
    ]
    cfg = compose("train", args)
    train(cfg)
    scalars = _scalars(tmp_path / "run")
    lr = {t: s for t, s in scalars.items() if "lr/" in t}
    assert sorted(lr) == ["train/lr/adamw", "train/lr/muon"]
    assert lr["train/lr/adamw"][0] == (0, pytest.approx(cfg.optim.lr))
    assert lr["train/lr/muon"][0] == (0, pytest.approx(cfg.optim.muon.lr))


@pytest.mark.slow
def test_tensorboard_serves_a_sweep_by_its_swept_key(tmp_path: Path) -> None:
    """A 2-job `-m` sweep as TensorBoard serves it: HPARAMS lists the swept key first and marks
    only it as differing (the keys every job shares are not), each job has one learning-rate
    curve (AdamW's), and heat maps and text samples from step 0 on."""
    from PIL import Image

    sweep = tmp_path / "sweep"
    args = [
        *tiny_overrides(tmp_path, write_corpus(tmp_path)),
        "optim.lr=1e-3,2e-3",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "callbacks.sample_text.max_new_tokens=4",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_cli("train", "-m", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = ["0_lr=0.001", "1_lr=0.002"]
    heads = ["val/attention/layer0/head0", "val/attention/layer0/head1"]
    q = urllib.parse.quote
    with tensorboard(sweep) as ask:
        assert sorted(ask("/data/runs")) == runs
        experiment = ask("/data/plugin/hparams/experiment", {"experimentName": ""})
        groups = ask(
            "/data/plugin/hparams/session_groups",
            {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "sliceSize": 10},
        )
        scalars, images, texts = (
            ask(f"/data/plugin/{plugin}/tags") for plugin in ("scalars", "images", "text")
        )
        steps, widths, samples = {}, [], {}
        for run in runs:
            for tag in heads:
                entries = ask(f"/data/plugin/images/images?run={q(run)}&tag={q(tag)}&sample=0")
                steps[run, tag] = [e["step"] for e in entries]
                png = ask(f"/data/plugin/images/individualImage?{entries[0]['query']}")
                widths.append(Image.open(io.BytesIO(png)).width)
            entries = ask(f"/data/plugin/text/text?run={q(run)}&tag=sample")
            samples[run] = [(e["step"], e["text"]) for e in entries]

    infos = experiment["hparamInfos"]
    assert infos[0]["name"] == "optim.lr"  # the swept key first
    assert [i["name"] for i in infos if i["differs"]] == ["optim.lr"]  # the shared ones not
    assert len(infos) > 20  # the others are all there, after it
    lrs = {g["name"]: g["hparams"]["optim.lr"] for g in groups["sessionGroups"]}
    assert lrs == {"0_lr=0.001": 0.001, "1_lr=0.002": 0.002}
    for run in runs:
        assert [t for t in scalars[run] if "lr/" in t] == ["train/lr/adamw"]  # one curve
        assert sorted(images[run]) == heads
        assert all(steps[run, tag] == [0, 2, 4] for tag in heads)  # step 0: the untrained model
        assert texts[run] == ["sample"]
        assert [step for step, _ in samples[run]] == [0, 2, 4]
        assert all("max_new_tokens 4" in text for _, text in samples[run])
    assert all(width <= 330 for width in widths)  # IMAGES' card shows them at full size
