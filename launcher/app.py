"""Entry point: `python -m launcher` / `hydralm`.

Imports stay light (hydra + the schema) so that `--cfg job` and sweep submission never pay for
torch; the task module is imported only when a job really runs.
"""

import logging
import os
import sys

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig

from launcher import schema  # noqa: F401  (registers the schema and the asset resolver)
from launcher.errors import ConfigError
from launcher.host_memory import return_large_freed_blocks
from launcher.loggers import scrub_hydra_outputs
from launcher.validate import check_config

log = logging.getLogger("hydralm")


def run_task(cfg: DictConfig):
    """Validate `cfg` and call its task function. Tests call this with a composed config."""
    return_large_freed_blocks()
    check_config(cfg)
    return get_method(cfg.task.fn)(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig):
    scrub_hydra_outputs()  # secrets (api keys, tokens) never stay in .hydra/
    try:
        return run_task(cfg)
    except ConfigError as err:
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"hydralm: error{where}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def main():
    """Under torchrun/SLURM only rank 0 keeps Hydra's config copies and job log."""
    if int(os.environ.get("RANK", 0)) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return _hydra_main()
