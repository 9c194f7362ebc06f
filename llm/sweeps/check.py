"""Is a finished Optuna sweep whole? The check a sweep killed (SIGKILL, at any moment) and then
resumed with the same command must pass, as an uninterrupted one does.

``python -m llm.sweeps.check <sweep dir> <n_trials> [<study name>]`` prints what is wrong, one
line each, and exits 1 (0 and nothing printed: whole). From Python: :func:`check_sweep`.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any


def _study(sweep_dir: Path, study_name: str | None) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    if study_name is None:
        (study_name,) = optuna.get_all_study_names(storage)  # one study, or say which
    return optuna.load_study(study_name=study_name, storage=storage)


def check_sweep(sweep_dir: str | Path, n_trials: int, study_name: str | None = None) -> list[str]:
    """What is wrong with the finished single-worker sweep in ``sweep_dir`` (empty: nothing).

    Whole means: the study (``optuna.db``) holds exactly ``n_trials`` counted trials (completed,
    pruned, failed; interrupted ones are not counted) and none still running or waiting; each
    completed or pruned trial has one run folder and one row in the report, with its state;
    ``optimization_results.yaml`` counts the study's trials; no temporary file is left.
    """
    from omegaconf import OmegaConf
    from optuna.trial import TrialState

    from llm.sweeps import report
    from llm.sweeps.optuna_sweeper import counted_trials

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "optuna.db").is_file():
        return [f"{sweep_dir / 'optuna.db'}: no study"]
    study = _study(sweep_dir, study_name)
    trials = study.get_trials(deepcopy=False)
    problems = []
    counted = counted_trials(study)
    if counted != n_trials:
        problems.append(f"{counted} counted trials, not {n_trials}")
    for t in trials:
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            problems.append(f"trial {t.number} is still {t.state.name}")

    try:
        runs = [report.load_run(p, sweep_dir) for p in report.find_runs(sweep_dir)]
    except report.ReportError:  # no run folder at all
        runs = []
    report._load_studies(runs)  # the status of each trial's run, from the study
    folders = Counter(r.trial for r in runs if r.trial is not None)
    table = report.rows(runs)
    status = {"COMPLETE": "completed", "PRUNED": "pruned"}
    for t in trials:
        if t.state.name not in status:
            continue
        if folders[t.number] != 1:
            n = folders[t.number]
            problems.append(f"trial {t.number} ({t.state.name}) has {n} run folders")
        rows = [r for r in table if r["trial"] == t.number]
        if [r["status"] for r in rows] != [status[t.state.name]]:
            problems.append(f"trial {t.number} ({t.state.name}) in the report: {rows}")

    results = sweep_dir / "optimization_results.yaml"
    if not results.is_file():
        problems.append(f"{results}: missing")
    else:
        by_state = Counter(t.state.name.lower() for t in trials)
        if dict(OmegaConf.load(results).trials) != dict(by_state):
            problems.append(f"{results} does not count the study's trials ({dict(by_state)})")

    temp = sorted(str(p.relative_to(sweep_dir)) for p in sweep_dir.rglob("*.tmp"))
    if temp:
        problems.append(f"temporary files left: {temp}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or not args[1].isdigit():
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    problems = check_sweep(args[0], int(args[1]), args[2] if len(args) == 3 else None)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
