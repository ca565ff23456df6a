"""Entry point: `python -m launcher` / `hydralm`.

Imports stay light (hydra + the schema) so that `--cfg job` and sweep submission never pay for
torch; the task module is imported only when a job really runs. The checks before work run in
ChecksBeforeWork (launcher/cli/validate.py), before Hydra creates any directory, and again here, where
the job runs.
"""

import faulthandler
import logging
import os
import signal
import sys
import traceback

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig

from launcher import schema  # noqa: F401  (registers the schema and the asset resolver)
from launcher.cli.console import masked_console, one_line_errors, refuse
from launcher.cli.validate import check_config
from launcher.errors import ConfigError, RunStopped
from launcher.job_log import record_in_job_log
from launcher.store.outputs import scrub_hydra_outputs
from launcher.training.host_memory import return_large_freed_blocks
from launcher.training.objective import objective_value

log = logging.getLogger("hydralm")
# torchao, once installed (train.precision=bf16_sr), is imported by peft in every run; it logs that
# kernels built for another torch release fail to load, and torch warns about its enum
# registrations: nothing a user can act on, so only their errors are shown.
for noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(noisy).setLevel(logging.ERROR)


def run_task(cfg: DictConfig):
    """Validate `cfg` and call its task function. Tests call this with a composed config."""
    return_large_freed_blocks()
    check_config(cfg)
    if cfg.task.uses_model:
        from launcher.model.device_defaults import apply_device_defaults

        line = apply_device_defaults(cfg)  # every `auto` resolved once, before the run's identity is taken
        if line and os.environ.get("RANK", "0") == "0":
            # The console only: until the run has claimed output_dir, the job log there may be
            # another run's (launcher/store/claim.py), and a refused run writes nothing into it.
            print(line, flush=True)
    return get_method(cfg.task.fn)(cfg)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def _hydra_main(cfg: DictConfig):
    scrub_hydra_outputs()  # secrets (api keys, tokens) never stay in .hydra/
    try:
        result = run_task(cfg)
    except ConfigError as err:
        refuse(err)
    except RunStopped as stopped:  # every rank stops alike; rank 0 says why
        if os.environ.get("RANK", "0") == "0":
            announce_stop(f"hydralm: {stopped}")
        sys.exit(stopped.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints instead)
        announce_stop("hydralm: interrupted")
        sys.exit(128 + signal.SIGINT)
    except Exception:
        record_in_job_log(logging.ERROR, traceback.format_exc())  # hydralm.log keeps the error too
        raise
    return objective_value(cfg, result)  # the float a sweeper (Optuna) optimises


def announce_stop(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    record_in_job_log(logging.WARNING, line)


def main():
    """Under torchrun/SLURM only rank 0 keeps Hydra's config copies and job log. A native crash
    (a segfault, or an abort in a C++ library's teardown) prints every thread's Python stack first:
    on a cluster the job log is often all there is to go on."""
    faulthandler.enable()
    if int(os.environ.get("RANK", 0)) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    with masked_console(), one_line_errors():
        return _hydra_main()
