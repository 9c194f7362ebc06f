"""Hyperparameter sweeps: Hydra grid multiruns and the llm_optuna sweeper (search, resume,
failures, pruning), each checked through the run folders, the study DB and `llm.report`."""

from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
from helpers import run_cli
from omegaconf import OmegaConf
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 120
SEARCH = "hparams_search=shakespeare_char_cpu_optuna"


def _experiment(tmp_path: Path) -> list[str]:
    """A tiny-model experiment in a config dir of the test's own, and the overrides to use it.

    A grid job's folder names only what it sweeps (`0_lr=0.001`); the experiment is in each
    job's .hydra/overrides.yaml.
    """
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "sweep_test.yaml").write_text(
        f"""# @package _global_
defaults:
  - override /model: tiny
  - override /tokenizer: char
  - override /data: text_files
  - override /trainer: cpu
data:
  path: {corpus}
  batch_size: 4
trainer:
  max_steps: 4
  val_check_interval: 2
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
callbacks:
  sample_text: null
  attention: null
""",
        encoding="utf-8",
    )
    return [
        "experiment=sweep_test",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]


def _study(sweep: Path, name: str = "shakespeare_char_cpu") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep / 'optuna.db'}")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_multirun_cli_then_report(tmp_path: Path) -> None:

    sweep = tmp_path / "sweep"
    args = [*_experiment(tmp_path), "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"]
    proc = run_cli("train", "-m", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Sweep report" in proc.stdout  # the sweep ends with its table ...
    assert "Directory watcher" not in proc.stdout + proc.stderr  # ... without TensorBoard's chatter
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report")
    assert jobs == ["0_lr=0.001", "1_lr=0.002"]  # job number and swept values: short trial IDs
    for job in jobs:
        assert OmegaConf.load(sweep / job / ".hydra" / "config.yaml").trainer.max_steps == 4
    # TensorBoard on the sweep folder: one run per job, named by its overrides, with HPARAMS
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    tb = EventMultiplexer()
    tb.AddRunsFromDirectory(str(sweep))
    tb.Reload()
    assert sorted(tb.Runs()) == jobs  # each job's events in its own folder: named by overrides
    hparams = tb.PluginRunToTagToContent("hparams")
    assert all("_hparams_/session_start_info" in hparams[job] for job in jobs)
    from tensorboard.plugins.hparams import plugin_data_pb2

    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        hparams[jobs[0]]["_hparams_/experiment"]
    ).experiment
    differs = [i.name for i in experiment.hparam_infos if i.differs]
    assert differs == ["optim.lr"]  # the sweep's axis; its constant experiment= is not marked

    proc = run_cli("report", f"dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optim.lr=0.001" in proc.stdout and "report.csv" in proc.stdout
    rows = _csv(sweep / "report" / "report.csv")
    assert sorted(r["run"] for r in rows) == jobs
    assert {r["status"] for r in rows} == {"completed"}
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses) and all(math.isfinite(v) for v in losses)
    assert all(float(r["tokens_per_sec"]) > 0 and r["best_step"] for r in rows)
    assert any("optim.lr=0.002" in r["overrides"] for r in rows)
    assert (sweep / "report" / "val_loss.png").stat().st_size > 0
    assert "optim.lr=0.001" in (sweep / "report" / "report.md").read_text()


@pytest.mark.slow
def test_grid_sweep_over_norm_and_mlp_trains_each_architecture(
    tmp_path: Path, llm_main: Any
) -> None:
    """`-m model.norm=... model.mlp=...`: four jobs, each checkpointing the model it names."""
    sweep = tmp_path / "sweep"
    grid = ["model.norm=layernorm,rmsnorm", "model.mlp=gelu,swiglu"]
    assert llm_main("train", "-m", *_experiment(tmp_path), *grid, f"hydra.sweep.dir={sweep}") == 0
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report")
    assert jobs == [
        "0_norm=layernorm,mlp=gelu",
        "1_norm=layernorm,mlp=swiglu",
        "2_norm=rmsnorm,mlp=gelu",
        "3_norm=rmsnorm,mlp=swiglu",
    ]
    for job in jobs:
        norm, mlp = job.split("norm=")[1].split(",")[0], job.split("mlp=")[1]
        cfg = OmegaConf.load(sweep / job / ".hydra" / "config.yaml")
        assert (cfg.model.norm, cfg.model.mlp) == (norm, mlp)
        raw = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        model = raw["hyper_parameters"]["model"]
        assert (model["norm"], model["mlp"], raw["global_step"]) == (norm, mlp, 4)
        sd = raw["state_dict"]
        # tiny: n_embd 64, biases on; swiglu's c_fc holds gate and up (2 x 192), rmsnorm no bias
        assert sd["model.h.0.mlp.c_fc.weight"].shape[0] == (384 if mlp == "swiglu" else 256)
        assert ("model.h.0.ln_1.bias" in sd) == (norm == "layernorm")
    assert llm_main("report", f"dir={sweep}") == 0
    rows = _csv(sweep / "report" / "report.csv")
    assert sorted(r["run"] for r in rows) == jobs and {r["status"] for r in rows} == {"completed"}
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses) and len(set(losses)) == 4  # ranked; four different models


@pytest.mark.slow
def test_multirun_refuses_relaunching_strategies(tmp_path: Path, llm_main: Any, capsys) -> None:
    args = [*_experiment(tmp_path), "trainer=ddp", f"hydra.sweep.dir={tmp_path / 's'}"]
    assert llm_main("train", "-m", *args, "optim.lr=1e-3,2e-3") == 1
    assert "cannot run under --multirun" in capsys.readouterr().err


@pytest.mark.slow
def test_optuna_search_three_trials_then_report(tmp_path: Path, llm_main: Any) -> None:
    from llm.sweeps import report

    sweep = tmp_path / "sweep"
    llm_main(
        "train",
        "-m",
        SEARCH,
        *_experiment(tmp_path),
        "hydra.sweeper.n_trials=3",
        "data.batch_size=choice(4,8)",  # overrides the config's choice(8, ..., 24)
        f"hydra.sweep.dir={sweep}",
    )
    study = _study(sweep)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for t in study.trials:
        assert set(t.params) == {
            "optim.lr",
            "optim.weight_decay",
            "model.dropout",
            "data.batch_size",
        }
        assert 1e-4 <= t.params["optim.lr"] <= 3e-3 and t.params["data.batch_size"] in (4, 8)
        assert sorted(t.intermediate_values) == [2, 4]  # val at global steps 2 and 4
        assert t.value == pytest.approx(min(t.intermediate_values.values()))
        cfg = OmegaConf.load(sweep / f"trial_{t.number}" / ".hydra" / "config.yaml")
        assert cfg.optim.lr == pytest.approx(t.params["optim.lr"])
        assert cfg.data.batch_size == t.params["data.batch_size"]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(study.best_value)

    out = report.report(sweep)
    assert [r["trial"] for r in out["rows"]] == [
        t.number for t in sorted(study.trials, key=lambda t: t.value)
    ]
    assert {r["status"] for r in out["rows"]} == {"completed"}
    names = {p.name for p in out["files"]}
    assert {"report.md", "report.csv", "val_loss.png"} <= names
    assert names >= {
        "optuna_shakespeare_char_cpu_history.png",
        "optuna_shakespeare_char_cpu_importance.png",
    }


def _fake_train(plan: dict[int, Any]) -> Any:
    """A stand-in for llm.cli.train.train: per trial number, a value to return or raise."""

    def train(cfg: Any) -> dict[str, Any]:
        outcome = plan.get(int(os.environ["LLM_OPTUNA_TRIAL"]), cfg.optim.lr)
        if isinstance(outcome, BaseException):
            raise outcome
        return {"best_val_loss": outcome, "shutdown": None}

    return train


@pytest.mark.slow
def test_failing_and_nan_trials_are_failed_and_search_goes_on(
    tmp_path: Path, llm_main: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llm.cli.train

    monkeypatch.setattr(llm.cli.train, "train", _fake_train({0: RuntimeError("boom"), 1: math.nan}))
    sweep = tmp_path / "sweep"
    llm_main(
        "train",
        "-m",
        SEARCH,
        *_experiment(tmp_path),
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
    )
    trials = _study(sweep).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["fail_reason"] == "RuntimeError: boom"
    assert "non-finite" in trials[1].user_attrs["fail_reason"]
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_trial == 2


@pytest.mark.slow
def test_interrupted_search_resumes_and_continues_trial_count(
    tmp_path: Path, llm_main: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import llm.cli.train
    from llm.sweeps import report

    sweep = tmp_path / "sweep"
    args = [
        "-m",
        SEARCH,
        *_experiment(tmp_path),
        "hydra.sweeper.n_trials=4",
        "data.batch_size=choice(4,8)",
        f"hydra.sweep.dir={sweep}",
    ]
    monkeypatch.setattr(llm.cli.train, "train", _fake_train({2: KeyboardInterrupt()}))
    assert llm_main("train", *args) == 130  # Ctrl-C during trial 2 stops the search
    trials = _study(sweep).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert trials[2].user_attrs["fail_reason"] == "interrupted"

    monkeypatch.setattr(llm.cli.train, "train", _fake_train({}))  # fake: the count is under test
    llm_main("train", *args)  # same sweep dir, same search space = same study
    trials = _study(sweep).trials
    # the interrupted trial does not count: two more trials make four counted ones
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert [t.state for t in trials[3:]] == [TrialState.COMPLETE] * 2
    assert (sweep / "trial_4" / ".hydra").is_dir()
    status = {r["trial"]: r["status"] for r in report.report(sweep)["rows"]}
    assert status == {
        0: "completed",
        1: "completed",
        2: "interrupted",
        3: "completed",
        4: "completed",
    }

    # a changed search space is refused, not half-used
    assert llm_main("train", *args, "hydra.sweeper.n_trials=5", "data.batch_size=choice(4,16)") == 1
    assert "does not match study" in capsys.readouterr().err
    assert len(_study(sweep).trials) == 5


@pytest.mark.slow
def test_pruner_stops_trial_at_its_val_loss(tmp_path: Path, llm_main: Any) -> None:
    from llm.sweeps import report

    sweep = tmp_path / "sweep"
    llm_main(
        "train",
        "-m",
        SEARCH,
        *_experiment(tmp_path),
        "hydra.sweeper.n_trials=1",
        "data.batch_size=4",
        "hydra.sweeper.pruner=null",  # then a new mapping (else the two would be merged)
        "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, upper: 0.5}",
        f"hydra.sweep.dir={sweep}",
    )
    (trial,) = _study(sweep).trials
    assert trial.state == TrialState.PRUNED
    assert "data.batch_size" not in trial.params  # pinned by the plain override
    assert list(trial.intermediate_values) == [2]  # stopped after the first validation
    ckpt = torch.load(sweep / "trial_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    (row,) = report.report(sweep)["rows"]
    assert row["status"] == "pruned" and row["trial"] == 0


@pytest.mark.slow
def test_finetune_trial_is_pruned_too(tmp_path: Path, llm_main: Any) -> None:
    """`llm finetune -m` under the Optuna sweeper gets the same pruning callback."""
    from helpers import char_checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    conf = tmp_path / "conf" / "hparams_search"
    conf.mkdir(parents=True)
    (conf / "finetune_test.yaml").write_text(
        """# @package _global_
defaults:
  - override /hydra/sweeper: llm_optuna
hydra:
  sweeper:
    study_name: finetune
    storage: sqlite:///${hydra.sweep.dir}/optuna.db
    n_trials: 1
    pruner: {_target_: optuna.pruners.ThresholdPruner, upper: 0.5}
    params:
      optim.lr: tag(log, interval(1e-4, 1e-3))
""",
        encoding="utf-8",
    )
    sweep = tmp_path / "sweep"
    llm_main(
        "finetune",
        "-m",
        "hparams_search=finetune_test",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "task=text",
        f"init={char_checkpoint(tmp_path / 'init.ckpt')}",
        f"data.path={corpus}",
        "data.batch_size=4",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
    )
    (trial,) = _study(sweep, "finetune").trials
    assert trial.state == TrialState.PRUNED and "optim.lr" in trial.params
    assert list(trial.intermediate_values) == [2]  # stopped after the first validation


class _FakeTrainer(SimpleNamespace):
    def __init__(self, step: int, loss: float) -> None:
        super().__init__(
            global_step=step,
            callback_metrics={"val/loss": torch.tensor(loss)},
            sanity_checking=False,
            is_global_zero=True,
            strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
            should_stop=False,
        )


@pytest.mark.slow
def test_pruning_callback_reports_at_global_step(tmp_path: Path) -> None:
    from llm.sweeps.pruning import StepPruningCallback, trial_from_env

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    asked = study.ask()
    env = {"LLM_OPTUNA_STORAGE": storage, "LLM_OPTUNA_STUDY": "s", "LLM_OPTUNA_TRIAL": "0"}
    trial = trial_from_env(env, pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    assert trial is not None and trial.number == asked.number
    assert trial_from_env({}) is None

    cb = StepPruningCallback(trial)
    ok = _FakeTrainer(step=250, loss=0.5)
    cb.on_validation_end(ok, None)  # type: ignore[arg-type]
    assert not ok.should_stop
    cb.check_pruned()  # not pruned: no exception
    bad = _FakeTrainer(step=500, loss=2.0)
    cb.on_validation_end(bad, None)  # type: ignore[arg-type]
    assert bad.should_stop and cb.pruned_at == 500
    assert study.trials[0].intermediate_values == {250: 0.5, 500: 2.0}
    with pytest.raises(optuna.TrialPruned, match="step 500"):
        cb.check_pruned()

    study.tell(asked, 0.5)
    with pytest.raises(RuntimeError, match="not RUNNING"):
        trial_from_env(env)


def test_search_space_syntax_and_errors() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.errors import HydraException
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from llm.sweeps.optuna_sweeper import classify, parse_search_space

    parser = OverridesParser.create()
    space, fixed = parse_search_space(
        parser.parse_overrides(
            [
                "optim.lr=tag(log, interval(1e-4, 1e-2))",
                "model.dropout=interval(0.0, 0.3)",
                "model.n_layer=range(2, 8, 2)",
                "data.batch_size=choice(8, 16)",
                "model.bias=true,false",
                "trainer.max_steps=100",
            ]
        )
    )
    assert space == {
        "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "model.dropout": FloatDistribution(0.0, 0.3),
        "model.n_layer": IntDistribution(2, 6, step=2),
        "data.batch_size": CategoricalDistribution([8, 16]),
        "model.bias": CategoricalDistribution([True, False]),
    }
    assert fixed == ["trainer.max_steps=100"]
    # later wins: a plain value pins a searched key, a sweep replaces the config's range
    space, fixed = parse_search_space(
        parser.parse_overrides(["a=choice(1, 2)", "b=1", "a=3", "b=interval(0.0, 1.0)"])
    )
    assert space == {"b": FloatDistribution(0.0, 1.0)} and fixed == ["a=3"]
    with pytest.raises(HydraException, match="unknown tag"):
        parse_search_space(parser.parse_overrides(["optim.lr=tag(loggg, interval(1, 2))"]))
    with pytest.raises(HydraException, match="invalid"):
        parse_search_space(parser.parse_overrides(["optim.lr=tag(log, interval(0.0, 1.0))"]))
    with pytest.raises(HydraException, match="not supported"):
        parse_search_space(parser.parse_overrides(["model=glob(*)"]))

    def ret(value: Any, status: JobStatus = JobStatus.COMPLETED) -> JobReturn:
        r = JobReturn(status=status)
        r._return_value = value
        return r

    assert classify(ret(1.5)) == (TrialState.COMPLETE, 1.5, None)
    assert classify(ret(math.nan))[0] == TrialState.FAIL
    assert classify(ret(math.inf))[0] == TrialState.FAIL
    assert classify(ret(ValueError("x"), JobStatus.FAILED)) == (
        TrialState.FAIL,
        None,
        "ValueError: x",
    )
    assert classify(ret(optuna.TrialPruned(), JobStatus.FAILED))[0] == TrialState.PRUNED


def test_unusable_storage_url_is_a_clear_error(tmp_path: Path) -> None:
    from hydra.errors import HydraException

    from llm.sweeps.optuna_sweeper import LLMOptunaSweeperImpl

    blocker = tmp_path / "file"
    blocker.write_text("")
    kwargs: dict[str, Any] = dict(
        study_name="s", direction="minimize", n_trials=1, n_jobs=1, sampler=None, pruner=None,
        params=None, heartbeat_interval=None, grace_period=None,
    )  # fmt: skip
    for url in (f"sqlite:///{blocker}/sub/optuna.db", "nosuchdb://x"):
        sweeper = LLMOptunaSweeperImpl(storage=url, **kwargs)
        with pytest.raises(HydraException, match="Cannot open the Optuna storage"):
            sweeper.create_study()


def _orphans_study(sweep: Path) -> tuple[optuna.Study, Any]:
    """A study of the shipped search with heartbeats (every 60 s, a trial silent for an hour
    is stale), and a way to age a trial's heartbeat by two hours."""
    import sqlite3
    import warnings

    sweep.mkdir(parents=True)
    db = sweep / "optuna.db"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are "experimental"
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{db}", heartbeat_interval=60, grace_period=3600
        )
    study = optuna.create_study(study_name="shakespeare_char_cpu", storage=storage)

    def beat(trial: optuna.Trial, hours_ago: int = 0) -> None:
        storage.record_heartbeat(trial._trial_id)
        if hours_ago:  # what a worker that stopped beating long ago left behind
            with sqlite3.connect(db) as con:
                con.execute(
                    "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?) "
                    "WHERE trial_id = ?",
                    (f"-{hours_ago} hours", trial._trial_id),
                )
            con.close()

    return study, beat


@pytest.mark.skipif(sys.platform != "linux", reason="process start times are read from /proc")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_trials_of_gone_workers_are_failed_without_waiting(tmp_path: Path) -> None:
    """A RUNNING trial whose worker is gone is interrupted: on this host when its process is
    gone (at once, whatever its heartbeat), elsewhere when its heartbeat went stale."""
    import subprocess

    from llm.sweeps.optuna_sweeper import (
        WORKER,
        counted_trials,
        fail_orphaned_trials,
        worker_alive,
        worker_record,
    )

    study, beat = _orphans_study(tmp_path / "sweep")
    elsewhere = {"host": "another-host", "pid": os.getpid(), "started": None}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    live = subprocess.Popen(  # runs until its stdin closes
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, text=True
    )
    try:
        gone = worker_record(int(dead.stdout))  # exited and reaped: no such process
        running = worker_record(live.pid)
        reused = {**running, "started": running["started"] - 1}  # the pid, another process
        owners = [
            elsewhere,  # 0: stale heartbeat -> failed
            elsewhere,  # 1: fresh heartbeat -> running
            gone,  # 2: fresh heartbeat, but its process is gone -> failed
            running,  # 3: stale heartbeat, but its process runs -> running
            reused,  # 4 -> failed
            None,  # 5: nothing known, no heartbeat (another sweeper's) -> running
        ]
        trials = [study.ask() for _ in owners]
        for trial, owner, hours in zip(trials, owners, [2, 0, 0, 2, 0, 0], strict=True):
            if owner is not None:
                trial.set_user_attr(WORKER, owner)
                beat(trial, hours_ago=hours)
        assert [worker_alive(o) for o in owners] == [None, None, False, True, False, None]
        assert worker_alive(worker_record()) is True

        assert fail_orphaned_trials(study) == [0, 2, 4]
    finally:
        live.communicate("")
    states = [t.state for t in study.trials]
    R, F = TrialState.RUNNING, TrialState.FAIL
    assert states == [F, R, F, R, F, R]
    assert {t.user_attrs.get("fail_reason") for t in study.trials if t.state == F} == {
        "interrupted"
    }
    assert counted_trials(study) == 3  # the running ones; the interrupted ones are made up for
    assert fail_orphaned_trials(study) == [3]  # now that its process has exited


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_killed_workers_trial_is_failed_and_not_counted(
    tmp_path: Path, llm_main: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials left RUNNING by killed workers (one here, one elsewhere) are failed when the
    search resumes, and made up for."""
    import subprocess

    import llm.cli.train
    from llm.sweeps.optuna_sweeper import WORKER, worker_record

    sweep = tmp_path / "sweep"
    study, beat = _orphans_study(sweep)
    here = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    killed_here, killed_elsewhere = study.ask(), study.ask()
    killed_here.set_user_attr(WORKER, worker_record(int(here.stdout)))
    killed_elsewhere.set_user_attr(WORKER, {"host": "another-host", "pid": 1, "started": None})
    beat(killed_here)  # fresh: no need to wait for it to go stale
    beat(killed_elsewhere, hours_ago=2)
    monkeypatch.setattr(llm.cli.train, "train", _fake_train({}))
    llm_main(
        "train",
        "-m",
        SEARCH,
        *_experiment(tmp_path),
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.heartbeat_interval=60",
        "hydra.sweeper.grace_period=3600",
        f"hydra.sweep.dir={sweep}",
    )
    trials = _study(sweep).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert [t.user_attrs.get("fail_reason") for t in trials[:2]] == ["interrupted"] * 2
    assert trials[2].user_attrs[WORKER] == worker_record()  # this process ran it


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "before"),
    [  # killed after trial 1 was asked (before its job ran), or after it was told
        ("sweep.trial_started@2", [TrialState.COMPLETE, TrialState.RUNNING]),
        ("sweep.trial_told@2", [TrialState.COMPLETE, TrialState.COMPLETE]),
    ],
)
def test_sigkilled_search_resumes_to_n_trials(
    tmp_path: Path, fault: str, before: list[TrialState]
) -> None:
    """`llm train -m` SIGKILLed at a named point, then the same command again: n_trials counted
    trials, the killed one interrupted and made up for, each completed one reported once."""
    from llm import faults
    from llm.sweeps import check
    from llm.sweeps.check import check_sweep

    sweep = tmp_path / "sweep"
    args = [
        "-m",
        SEARCH,
        *_experiment(tmp_path),
        "trainer.max_steps=2",
        "hydra.sweeper.n_trials=3",
        "data.batch_size=choice(4,8)",
        f"hydra.sweep.dir={sweep}",
    ]
    killed = run_cli("train", *args, cwd=tmp_path, **{faults.ENV: fault})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [t.state for t in _study(sweep).trials] == before
    assert "2 counted trials, not 3" in check_sweep(sweep, 3)  # the killed one still counts

    resumed = run_cli("train", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = _study(sweep).trials
    completed = [t.number for t in trials if t.state == TrialState.COMPLETE]
    if before[-1] == TrialState.RUNNING:  # interrupted, not counted: trials 2 and 3 make up
        assert trials[1].state == TrialState.FAIL
        assert trials[1].user_attrs["fail_reason"] == "interrupted"
        assert completed == [0, 2, 3]
        assert not (sweep / "trial_1").exists()  # its job never started
    else:
        assert completed == [0, 1, 2]
    assert check_sweep(sweep, 3) == []  # n_trials counted, none running, no temp files, ...
    assert check.main([str(sweep), "3"]) == 0
    # the report the sweep ends with (`llm report`'s) lists each completed trial once
    assert "Sweep report" in resumed.stdout
    rows = _csv(sweep / "report" / "report.csv")
    assert sorted((int(r["trial"]), r["status"]) for r in rows) == [
        (n, "completed") for n in completed
    ]


@pytest.mark.parametrize(
    ("argv", "overrides", "name"),
    [
        (["-m", "experiment=x", "optim.lr=1e-3,2e-3", "data.path=/d"],
         ["experiment=x", "optim.lr=0.001", "data.path=/d"], "0_lr=0.001"),
        (["-m", "optim.lr=1e-3,2e-3", "optim.muon.lr=range(1,3)"],  # two `lr`: keys kept whole
         ["optim.lr=0.001", "optim.muon.lr=2"], "0_optim.lr=0.001,optim.muon.lr=2"),
        (["-m", "model=choice(tiny,cpu)", "+trainer.x=1"], ["model=cpu", "+trainer.x=1"],
         "0_model=cpu"),
        (["-m", "optim.lr=1e-3"], ["optim.lr=0.001"], "0_optim.lr=0.001"),  # nothing swept
    ],
)  # fmt: skip
def test_a_grid_job_is_named_by_its_number_and_swept_values(
    argv: list[str], overrides: list[str], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm.cli.app import job_name

    monkeypatch.setattr(sys, "argv", ["llm", *argv])
    assert job_name(0, overrides) == name
