"""Summarise a sweep (``llm report dir=logs/train/multiruns/<date>``): rank its runs.

Finds every Hydra run folder (one with ``.hydra/config.yaml``) under the given folder, reads its
TensorBoard scalars and Hydra overrides, and writes ``report.md``, ``report.csv`` and PNG plots
(val-loss curves; per Optuna study, the objective per trial and the parameter importances).
Works on a sweep folder, a whole ``logs/`` tree or a single run. Benchmarks logged during
training (``val/mc_acc``, ``val/mc_acc_norm``) and the post-training figures (DPO's
``val/reward_acc``, GRPO's ``val/accuracy`` and ``val/reward``) get a column of their best value
when any run has them, and the table can be sorted by one (``sort=val/mc_acc_norm``, highest
first).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from llm.io import atomic_write_bytes, atomic_write_text
from llm.sweeps.env import ENV_STORAGE, ENV_STUDY, ENV_TRIAL

# a run without a final result whose files changed this recently is taken to be still running
RUNNING_WINDOW_S = 300.0
COLUMNS = [
    "rank",
    "run",
    "status",
    "best_val_loss",
    "best_step",
    "last_step",
    "tokens_per_sec",
    "trial",
    "overrides",
]
# scalars shown (best value over the run) when logged; all are higher-is-better: benchmarks, DPO's
# reward accuracy, GRPO's held-out accuracy and reward
BENCHMARKS = ("val/mc_acc", "val/mc_acc_norm", "val/reward_acc", "val/accuracy", "val/reward")
DEFAULT_SORT = "best_val_loss"
# the run's end figures (llm.training.board.END): written once training ends; "hp/": before
END_PREFIXES = ("whole_run/", "hp/")


class ReportError(ValueError):
    """Bad input to the report (no such folder, no runs in it)."""


@dataclass
class Run:
    """What the report knows about one Hydra run folder."""

    path: Path
    name: str
    overrides: list[str]
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_sec: float | None = None
    last_step: int | None = None
    status: str = "unknown"
    trial: int | None = None
    study: tuple[str, str] | None = None  # (storage URL, study name) of an Optuna trial
    benchmarks: dict[str, float] = field(default_factory=dict)  # tag -> best (highest) value

    @property
    def best(self) -> tuple[float, int | None]:
        """Lowest finite val loss after training began, and its step (NaN, None: none)."""
        finite = [(v, s) for s, v in self.val_curve if s > 0 and math.isfinite(v)]
        if not finite:
            return math.nan, None
        value, step = min(finite)
        return value, step


def find_runs(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included) that holds ``.hydra/config.yaml``."""
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder; pass a sweep or logs folder")
    runs = {p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == ".hydra"}
    if not runs:
        raise ReportError(
            f"No runs under {root}: a run folder has .hydra/config.yaml and TensorBoard events "
            "(e.g. logs/train/multiruns/<date>/0_optim.lr=0.001). Pass a sweep folder "
            "(logs/train/multiruns/<date>), a logs folder or a run folder."
        )
    return sorted(runs)


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series in a TensorBoard folder (every events file in it, in order)."""
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its file-by-file INFO lines
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
        for tag in acc.Tags().get("scalars", [])
    }


def _overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides, minus paths excluded from Hydra's override_dirname."""
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(path)] if path.is_file() else []
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    exclude: set[str] = set()
    if hydra_yaml.is_file():
        keys = OmegaConf.select(
            OmegaConf.load(hydra_yaml), "hydra.job.config.override_dirname.exclude_keys"
        )
        exclude = {str(k) for k in keys or []}
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in exclude]


def _trial_ref(run_dir: Path) -> tuple[str, str, int] | None:
    """(storage URL, study name, trial number) if the run is a trial of the llm_optuna sweeper."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return None
    env = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.env_set") or {}
    if ENV_TRIAL not in env or ENV_STUDY not in env:
        return None
    storage = str(env.get(ENV_STORAGE) or "")
    local = run_dir.parent / "optuna.db"
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).is_file():
        storage = f"sqlite:///{local.resolve()}" if local.is_file() else storage  # folder moved
    return storage, str(env[ENV_STUDY]), int(env[ENV_TRIAL])


_ENDINGS = {"[ERROR] - run failed": "failed", "] - stopped by SIG": "interrupted"}


def _ending(run_dir: Path) -> str | None:
    """How the run's last session ended by its log file: "failed" (the ``llm`` command writes
    the traceback), "interrupted" (GracefulShutdown's line), or None. A resumed run appends to
    the same log, so only what follows its last start counts."""
    ending = None
    for log_file in run_dir.glob("*.log"):
        with open(log_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                if "][llm][INFO] - llm " in line and ": " in line.split(" - ", 1)[-1]:
                    ending = None  # a (re)start: `llm train: <run folder>`
                for mark, what in _ENDINGS.items():
                    if mark in line:
                        ending = what
    return ending


def _end_value(scalars: dict[str, list[tuple[int, float]]], name: str) -> float | None:
    """One of the run's end figures (the last written, finite), or None before the run ended.

    Tokens/s is this one value, the summary's (tokens over the training time, validation
    excluded), not a statistic of the ``train/tokens_per_sec`` windows.
    """
    for prefix in END_PREFIXES:
        series = sorted(scalars.get(prefix + name, []))
        if series and math.isfinite(series[-1][1]):
            return series[-1][1]
    return None


def _disk_status(run: Run, scalars: dict[str, list[tuple[int, float]]]) -> str:
    """Status of a run that is not an Optuna trial, from what it left on disk."""
    ending = _ending(run.path)
    if ending is not None:
        return ending
    if _end_value(scalars, "best_val_loss") is not None:  # train() logs it after fit returns
        return "completed"
    newest = max((p.stat().st_mtime for p in run.path.rglob("*") if p.is_file()), default=0.0)
    return "running" if time.time() - newest < RUNNING_WINDOW_S else "failed"


def load_run(run_dir: Path, root: Path) -> Run:
    """Read one run folder's overrides, scalars and (pre-Optuna) status."""
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    run = Run(path=run_dir, name=name, overrides=_overrides(run_dir))
    scalars = read_scalars(run_dir)  # the TensorBoard events live in the run folder itself
    run.val_curve = sorted(scalars.get("val/loss", []))
    steps = [s for tag, ser in scalars.items() if not tag.startswith(END_PREFIXES) for s, _ in ser]
    run.last_step = max(steps, default=None)
    run.tokens_per_sec = _end_value(scalars, "tokens_per_sec")
    for tag in BENCHMARKS:
        values = [v for _, v in scalars.get(tag, []) if math.isfinite(v)]
        if values:
            run.benchmarks[tag] = max(values)
    run.status = _disk_status(run, scalars)
    ref = _trial_ref(run_dir)
    if ref is not None:
        run.study, run.trial = (ref[0], ref[1]), ref[2]
    return run


def _load_studies(runs: list[Run]) -> dict[tuple[str, str], Any]:
    """Load each Optuna study the runs belong to and set their status from its trial states."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies: dict[tuple[str, str], Any] = {}
    for key in sorted({r.study for r in runs if r.study is not None}):
        try:
            studies[key] = optuna.load_study(study_name=key[1], storage=key[0])
        except Exception as e:  # keep the disk-based status; say why
            print(f"warning: cannot load study {key[1]!r} from {key[0]}: {e}", file=sys.stderr)
    names = {
        "COMPLETE": "completed",
        "PRUNED": "pruned",
        "FAIL": "failed",
        "RUNNING": "running",
        "WAITING": "waiting",
    }
    for run in runs:
        study = studies.get(run.study) if run.study else None
        if study is None:
            continue
        for t in study.get_trials(deepcopy=False):
            if t.number == run.trial:
                run.status = names.get(t.state.name, t.state.name.lower())
                if t.state.name == "FAIL" and t.user_attrs.get("fail_reason") == "interrupted":
                    run.status = "interrupted"
    return studies


NO_VAL = "no val/loss logged"


def _sort_key(run: Run, sort: str = DEFAULT_SORT) -> tuple[int, float, str]:
    """Best val loss lowest first (or a benchmark highest first), then runs without one, then
    failed runs."""
    if sort == DEFAULT_SORT:
        value = run.best[0]
    else:
        score = run.benchmarks.get(sort)
        value = -score if score is not None else math.nan
    if run.status == "failed":
        return (2, value if math.isfinite(value) else math.inf, run.name)
    return (0, value, run.name) if math.isfinite(value) else (1, 0.0, run.name)


def columns(runs: list[Run]) -> list[str]:
    """COLUMNS, with a column for each benchmark that any run logged (after best_step)."""
    logged = [t for t in BENCHMARKS if any(t in r.benchmarks for r in runs)]
    at = COLUMNS.index("best_step") + 1
    return [*COLUMNS[:at], *logged, *COLUMNS[at:]]


def check_sort(sort: str, runs: list[Run]) -> None:
    """``sort`` must be best_val_loss or a benchmark some run logged."""
    choices = [DEFAULT_SORT, *(c for c in columns(runs) if c in BENCHMARKS)]
    if sort not in choices:
        raise ReportError(
            f"sort={sort}: these runs can be sorted by {', '.join(choices)} (benchmarks appear "
            "once a run logs them, e.g. with callbacks.multiple_choice.path=...)"
        )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):  # digits 0: a count, grouped as the run summary prints it
        return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"
    return str(value)


def rows(runs: list[Run], sort: str = DEFAULT_SORT) -> list[dict[str, Any]]:
    """One dict per run (keys: :func:`columns`), best val loss first or, with ``sort``, the
    highest benchmark score first (runs without a value last)."""
    check_sort(sort, runs)
    names = columns(runs)
    out = []
    for rank, run in enumerate(sorted(runs, key=lambda r: _sort_key(r, sort)), start=1):
        value, step = run.best
        row = {
            "rank": rank,
            "run": run.name,
            "status": run.status,
            "best_val_loss": value if math.isfinite(value) else None,
            "best_step": step,
            **{tag: run.benchmarks.get(tag) for tag in BENCHMARKS},
            "last_step": run.last_step,
            "tokens_per_sec": run.tokens_per_sec,
            "trial": run.trial,
            "overrides": " ".join(run.overrides),
        }
        out.append({k: row[k] for k in names})
    return out


def to_csv(table: list[dict[str, Any]]) -> str:
    """The table as CSV, full precision, every override."""
    names = list(table[0]) if table else COLUMNS
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: "" if row[k] is None else row[k] for k in names})
    return buf.getvalue()


def to_markdown(table: list[dict[str, Any]], root: Path, sort: str = DEFAULT_SORT) -> str:
    """The table as markdown; overrides shared by every run are listed once above it."""
    names = list(table[0]) if table else COLUMNS
    lists = [row["overrides"].split() for row in table]
    common = set(lists[0]).intersection(*lists[1:]) if len(lists) > 1 else set()
    order = "best val loss first" if sort == DEFAULT_SORT else f"highest {sort} first"
    lines = [
        f"# Sweep report: {root}",
        "",
        f"{len(table)} {'run' if len(table) == 1 else 'runs'}: {order}, then runs without one, "
        "failed runs last.",
        "",
    ]
    if common:
        shared = " ".join(o for o in lists[0] if o in common)
        lines += [f"Overrides common to all runs: `{shared}`", ""]
    lines += ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row, overrides in zip(table, lists, strict=True):
        cells = {**row, "overrides": " ".join(o for o in overrides if o not in common)}
        if cells["best_val_loss"] is None:
            cells["best_val_loss"] = NO_VAL
        lines.append(
            "| "
            + " | ".join(
                _fmt(cells[k], 0 if k == "tokens_per_sec" else 4).replace("|", "\\|") for k in names
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _save_fig(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_val_curves(runs: list[Run], path: Path) -> Path | None:
    """Val loss against step, one line per run."""
    import matplotlib.pyplot as plt

    curves = [r for r in sorted(runs, key=_sort_key) if r.val_curve]
    if not curves:
        return None
    common = set(curves[0].overrides).intersection(*(r.overrides for r in curves[1:]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in curves:
        steps, values = zip(*run.val_curve, strict=True)
        # "3: model=cpu optim.lr=0.001" rather than the whole folder name
        head = run.name.split("_", 1)[0] if "=" in run.name else run.name
        label = " ".join([f"{head}:", *(o for o in run.overrides if o not in common)])
        label = label if len(label) <= 70 else label[:67] + "..."
        ax.plot(steps, values, marker="o", markersize=3, label=f"{label} ({run.status})")
    ax.set(xlabel="step", ylabel="val/loss", title="Validation loss")
    ax.grid(alpha=0.3)
    if len(curves) <= 20:
        ax.legend(fontsize=7)
    return _save_fig(fig, path)


def plot_study(study: Any, out: Path) -> list[Path]:
    """Objective per trial (with the best so far) and parameter importances of one study."""
    import matplotlib.pyplot as plt
    import optuna
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState

    written: list[Path] = []
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study.study_name)
    trials = study.get_trials(deepcopy=False)
    fig, ax = plt.subplots(figsize=(8, 5))
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if done:
        ax.scatter([t.number for t in done], [t.value for t in done], label="completed")
        best, xs, ys = math.inf, [], []
        minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
        for t in sorted(done, key=lambda t: t.number):
            v = t.value if minimize else -t.value
            best = min(best, v)
            xs.append(t.number)
            ys.append(best if minimize else -best)
        ax.step(xs, ys, where="post", color="C2", label="best so far")
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.scatter([t.number for t in pruned], last, marker="x", color="C3", label="pruned (last)")
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    if failed:
        ax.set_title(f"{study.study_name}: objective per trial (failed: {failed})")
    else:
        ax.set_title(f"{study.study_name}: objective per trial")
    ax.set(xlabel="trial", ylabel="objective (best val loss)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save_fig(fig, out / f"optuna_{safe}_history.png"))

    if len(done) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as e:  # e.g. a single-valued search space
            print(f"note: no parameter importances for {study.study_name}: {e}", file=sys.stderr)
            return written
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(importances) + 1.5))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title=f"{study.study_name}: parameter importances")
        written.append(_save_fig(fig, out / f"optuna_{safe}_importance.png"))
    return written


def default_out(root: Path) -> Path:
    """Where the report goes without ``out=``: ``report/`` inside a sweep folder (Hydra's
    ``multirun.yaml`` marks it), a run folder or a ``logs/`` tree; beside a plain folder of
    run folders (``logs/train/runs`` -> ``logs/train/runs_report``), where a ``report/`` in
    among them would read as one more run."""
    sweep = (root / "multirun.yaml").is_file()
    if sweep or not any((p / ".hydra" / "config.yaml").is_file() for p in root.iterdir()):
        return root / "report"
    return root.parent / f"{root.resolve().name}_report"


def report(
    root: str | Path, out: str | Path | None = None, sort: str | None = None
) -> dict[str, Any]:
    """Build the report for ``root``; returns the table rows and the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    root = Path(root)
    runs = [load_run(p, root) for p in find_runs(root)]
    out_dir = Path(out) if out is not None else default_out(root)
    studies = _load_studies(runs)
    sort = sort or DEFAULT_SORT
    table = rows(runs, sort)
    files = [
        atomic_write_text(out_dir / "report.md", to_markdown(table, root, sort)),
        atomic_write_text(out_dir / "report.csv", to_csv(table)),
    ]
    curve = plot_val_curves(runs, out_dir / "val_loss.png")
    if curve is not None:
        files.append(curve)
    for study in studies.values():
        files.extend(plot_study(study, out_dir))
    return {"rows": table, "files": files, "out_dir": out_dir}
