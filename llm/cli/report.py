"""``llm report dir=logs/train/multiruns/<date> [out=...] [sort=...]``: rank a sweep's runs.

Prints the table (also written as report.md and report.csv) and where the plots went.
"""

from __future__ import annotations

from omegaconf import DictConfig

from llm.cli.app import hydra_app


@hydra_app("report")
def main(cfg: DictConfig) -> None:
    """Write the report of ``dir`` into ``out`` (default ``<dir>/report``) and print it."""
    from llm.sweeps.report import report

    sort = cfg.get("sort")
    result = report(str(cfg.dir), None if cfg.out is None else str(cfg.out), sort and str(sort))
    print((result["out_dir"] / "report.md").read_text(encoding="utf-8"))
    print("Wrote:")
    for path in result["files"]:
        print(f"  {path}")
