"""`llm report`: run discovery, statuses from disk, ranking and the files it writes.

The runs here are synthetic (Hydra files + TensorBoard events written directly) so every status
can be produced without training; tests/test_sweep.py reports on real sweeps.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from llm.sweeps import report


def _make_run(
    root: Path,
    name: str,
    overrides: list[str],
    val: list[tuple[int, float]],
    *,
    tps: list[float] = (),  # type: ignore[assignment]
    finished: bool = False,
    interrupted: bool = False,
    failed: bool = False,
    age_s: float = 0.0,
    scalars: dict[str, list[tuple[int, float]]] | None = None,
) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": 1}), run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    hydra = {"hydra": {"job": {"config": {"override_dirname": {"exclude_keys": ["data.path"]}}}}}
    OmegaConf.save(OmegaConf.create(hydra), run / ".hydra" / "hydra.yaml")
    writer = SummaryWriter(str(run))  # llm writes its events into the run folder itself
    for i, v in enumerate(tps):
        writer.add_scalar("train/tokens_per_sec", v, i + 1)
        writer.add_scalar("train/loss", 4.0, i + 1)
    for step, v in val:
        writer.add_scalar("val/loss", v, step)
    for tag, series in (scalars or {}).items():
        for step, v in series:
            writer.add_scalar(tag, v, step)
    if finished:  # the end figures (llm.training.board), at the last step
        last = max((s for s, _ in val), default=len(tps))
        writer.add_scalar("whole_run/best_val_loss", min((v for _, v in val), default=0.0), last)
        if tps:  # the run's one tokens/s (tokens over training time), not these windows'
            writer.add_scalar("whole_run/tokens_per_sec", 1234.5, last)
    writer.close()
    if failed:  # what the llm command writes into the run's log file when the run fails
        (run / "train.log").write_text("[t][llm][ERROR] - run failed\nTraceback ...\n")
    if interrupted:  # GracefulShutdown's line; a resumed run's restart would come after it
        with open(run / "train.log", "a") as f:
            f.write("[t][llm][INFO] - llm train: /runs/x\n")
            f.write("[t][llm][INFO] - stopped by SIGTERM at step 3; checkpoint /x/last.ckpt\n")
    if age_s:
        old = time.time() - age_s
        for p in run.rglob("*"):
            os.utime(p, (old, old))
    return run


@pytest.mark.slow
def test_folder_without_runs_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, llm_main: Any
) -> None:
    assert llm_main("report", f"dir={tmp_path}") == 1
    err = capsys.readouterr().err
    assert "No runs under" in err and "Traceback" not in err
    assert llm_main("report", f"dir={tmp_path / 'missing'}") == 1
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(report.ReportError):
        report.find_runs(tmp_path)


@pytest.mark.slow
def test_report_ranks_runs_and_tells_their_status(
    tmp_path: Path, capsys: pytest.CaptureFixture, llm_main: Any
) -> None:
    sweep = tmp_path / "sweep"
    _make_run(
        sweep,
        "0_optim.lr=0.001",
        ["optim.lr=0.001", "model=tiny", "data.path=/x"],
        [(2, 3.0), (4, 2.5)],
        tps=[100.0, 200.0, 300.0],
        finished=True,
    )
    _make_run(
        sweep, "1_optim.lr=0.002", ["optim.lr=0.002", "model=tiny"], [(2, 2.8), (4, 2.9)],
        finished=True,
    )  # fmt: skip
    _make_run(  # stopped by Ctrl-C: GracefulShutdown checkpointed, then train() logged hparams
        sweep, "2_optim.lr=0.003", ["optim.lr=0.003", "model=tiny"], [(2, 3.5)],
        interrupted=True, finished=True,
    )  # fmt: skip
    _make_run(sweep, "3_optim.lr=0.1", ["optim.lr=0.1", "model=tiny"], [], age_s=3600)
    _make_run(sweep, "4_optim.lr=0.2", ["optim.lr=0.2", "model=tiny"], [])
    _make_run(  # failed after a validation: ranks after every run, even those without one
        sweep, "5_optim.lr=0.01", ["optim.lr=0.01", "model=tiny"], [(0, 4.2), (2, 2.0)], failed=True
    )
    _make_run(  # validated only before training (step 0): no val/loss of a trained model
        sweep, "6_optim.lr=0.02", ["optim.lr=0.02", "model=tiny"], [(0, 4.2)], finished=True
    )
    out = tmp_path / "out"

    assert llm_main("report", f"dir={sweep}", f"out={out}") == 0
    printed = capsys.readouterr().out
    assert str(out / "report.csv") in printed and str(out / "val_loss.png") in printed

    with (out / "report.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"]) for r in rows] == [
        ("0_optim.lr=0.001", "completed"),
        ("1_optim.lr=0.002", "completed"),
        ("2_optim.lr=0.003", "interrupted"),
        ("4_optim.lr=0.2", "running"),
        ("6_optim.lr=0.02", "completed"),
        ("5_optim.lr=0.01", "failed"),
        ("3_optim.lr=0.1", "failed"),
    ]
    assert float(rows[0]["best_val_loss"]) == pytest.approx(2.5) and rows[0]["best_step"] == "4"
    assert float(rows[1]["best_val_loss"]) == pytest.approx(2.8) and rows[1]["best_step"] == "2"
    assert float(rows[0]["tokens_per_sec"]) == pytest.approx(1234.5)
    assert rows[0]["overrides"] == "optim.lr=0.001 model=tiny"  # data.path is excluded
    assert rows[3]["best_val_loss"] == "" and rows[3]["rank"] == "4"
    assert float(rows[5]["best_val_loss"]) == pytest.approx(2.0)  # failed, yet its loss shows

    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| 5 | 6_optim.lr=0.02 | completed | no val/loss logged |" in md
    assert "Overrides common to all runs: `model=tiny`" in md
    assert "| 1 | 0_optim.lr=0.001 | completed | 2.5000 | 4 | 4 | 1,234 |  | optim.lr=0.001 |" in md
    assert (out / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_single_run_folder_is_a_report_of_one(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "run", ["optim.lr=0.001"], [(5, 1.0)], finished=True)
    result = report.report(run)
    assert [(r["run"], r["status"], r["best_step"]) for r in result["rows"]] == [
        ("run", "completed", 5)
    ]
    assert result["out_dir"] == run / "report"
    md = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "\n1 run: best val loss first" in md  # not "1 runs"


@pytest.mark.slow
def test_benchmark_columns_and_sorting_by_one(tmp_path: Path) -> None:
    """A benchmark column (best value) appears once any run logs it; sort= ranks by it, highest
    first, runs without it last; the default order stays the val loss."""
    mc = {"val/mc_acc_norm": [(2, 0.25), (4, 0.5)], "val/mc_acc": [(2, 0.3), (4, 0.2)]}
    _make_run(tmp_path, "a", ["optim.lr=1"], [(4, 2.0)], finished=True, scalars=mc)
    _make_run(tmp_path, "b", ["optim.lr=2"], [(4, 3.0)], finished=True,
              scalars={"val/mc_acc_norm": [(4, 0.75)]})  # fmt: skip
    _make_run(tmp_path, "c", ["optim.lr=3"], [(4, 1.0)], finished=True)
    by_loss = report.report(tmp_path)["rows"]
    assert [r["run"] for r in by_loss] == ["c", "a", "b"]
    assert list(by_loss[0])[5:7] == ["val/mc_acc", "val/mc_acc_norm"]
    assert by_loss[1]["val/mc_acc"] == pytest.approx(0.3)  # the best, not the last value
    by_mc = report.report(tmp_path, sort="val/mc_acc_norm")["rows"]
    assert [(r["run"], r["val/mc_acc_norm"]) for r in by_mc] == [
        ("b", 0.75), ("a", 0.5), ("c", None),
    ]  # fmt: skip
    # beside a plain folder of runs, not in among them
    md = (tmp_path.parent / f"{tmp_path.name}_report" / "report.md").read_text(encoding="utf-8")
    assert "highest val/mc_acc_norm first" in md and "| 0.7500 |" in md
    with pytest.raises(report.ReportError, match="sort=loss: these runs can be sorted by"):
        report.report(tmp_path, sort="loss")


def test_post_training_figures_get_their_columns(tmp_path: Path) -> None:
    """DPO's reward accuracy and GRPO's held-out accuracy, best value, highest first."""
    _make_run(tmp_path, "dpo", ["task=dpo"], [(4, 0.5)], finished=True,
              scalars={"val/reward_acc": [(0, 0.5), (4, 0.9)]})  # fmt: skip
    _make_run(tmp_path, "grpo", ["task=grpo"], [(4, -0.4)], finished=True,
              scalars={"val/accuracy": [(0, 0.1), (4, 0.4)], "val/reward": [(4, 0.4)]})  # fmt: skip
    table = report.report(tmp_path)["rows"]
    assert list(table[0])[5:8] == ["val/reward_acc", "val/accuracy", "val/reward"]
    by_run = {r["run"]: r for r in table}
    assert by_run["dpo"]["val/reward_acc"] == pytest.approx(0.9)
    assert by_run["grpo"]["val/accuracy"] == pytest.approx(0.4)
    ranked = report.report(tmp_path, sort="val/accuracy")["rows"]
    assert [r["run"] for r in ranked] == ["grpo", "dpo"]
