"""The command line's side of a sweep: which strategies a ``-m`` sweep cannot run, and the
sweep's table at its end (the jobs' side is :mod:`llm.sweeps.jobs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llm.cli.app import is_multirun
from llm.training.trainer import strategy_name


def check_multirun_strategy(cfg: DictConfig) -> None:
    """Lightning's ddp/fsdp re-run the script per rank, which would re-run the whole sweep."""
    if not is_multirun():
        return
    strategy = cfg.trainer.get("strategy")
    name = strategy_name(cfg.trainer)
    if any(k in name for k in ("ddp", "fsdp", "deepspeed")) and "spawn" not in name:
        raise ValueError(
            f"trainer.strategy={strategy} cannot run under --multirun: it launches this script "
            "again for every rank, which would start the sweep again. Sweep with a "
            "single-process trainer (trainer=cpu or trainer=gpu) or trainer=ddp_cpu "
            "(ddp_spawn), or run the multi-GPU job without -m"
        )


# The folder of the sweep this process ran (set when a -m sweep starts), for its report, and
# each job's full summary by its run folder (a job prints one line), for the sweep's end.
swept: Path | None = None
job_summaries: dict[str, str] = {}


class SweepReport(Callback):
    """Remembers the sweep folder, so the ``llm`` command ends a sweep with its table."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global swept
        swept = Path(str(config.hydra.sweep.dir))
        job_summaries.clear()


def print_sweep_report(folder: Path) -> None:
    """The table ``llm report`` prints, and where its files went (nothing if no job ran)."""
    from llm.sweeps.report import ReportError, report

    try:
        result = report(folder)
    except ReportError:
        return
    print("\n" + (result["out_dir"] / "report.md").read_text(encoding="utf-8"))
    print(f"Report folder: {result['out_dir']}  (llm report dir={folder} writes it again)")
    best = str((folder / result["rows"][0]["run"]).resolve()) if result["rows"] else None
    if best in job_summaries:  # the best job's summary (ran in this process): what to run next
        print(f"\nBest job ({result['rows'][0]['run']}):\n{job_summaries[best]}")
