"""The `report` task: plots and a comparison table of the runs in `report.dir` (one run or a sweep).

Reads finished runs only: no model, no process group. Same as `python -m launcher.cli.report DIR`.
"""

from pathlib import Path

from omegaconf import DictConfig

from launcher.cli.report import print_report, write_report


def report(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.report.out_dir) if cfg.report.out_dir else None
    result = write_report(Path(cfg.report.dir), out_dir)
    print_report(result)
    return result
