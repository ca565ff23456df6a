"""`hydra/launcher=hydralm_slurm` (what a `cluster` preset selects): hydra-submitit-launcher's
SLURM launcher that says what it did. Once the jobs are queued, each job's id, its log and how to
watch it (`squeue -j`, `sacct -j`, `tail -f`); as each ends, its SLURM state and result (steps, eval
loss, the final model). Submission is the plugin's own: the same executor parameters, one job
array per batch of sweep points. Imports no torch (it runs in the submitting process).
"""

import json
import time
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf


class SlurmJobsLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher, printing each job's id, log and state."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = self._submit(job_overrides, initial_job_idx)
        for job, overrides in zip(jobs, job_overrides):
            described = " ".join(filter_overrides(overrides)) or "the default config"
            print(f"hydralm: queued SLURM job {job.job_id} ({described})\n"
                  f"  log:   {job.paths.stdout}\n"
                  f"  watch: squeue -j {job.job_id}; sacct -j {job.job_id}; tail -f {job.paths.stdout}", flush=True)
        returns, failure = [], None
        for job in jobs:
            try:
                returns.append(job.results()[0])
            except Exception as error:  # reported with the others' states, then raised
                failure = failure or error
                print(f"hydralm: SLURM job {job.job_id} {final_state(job)}: {str(error).strip().splitlines()[-1]}\n"
                      f"  log:   {job.paths.stderr}", flush=True)
                continue
            print(f"hydralm: SLURM job {job.job_id} {final_state(job)}: {job_result_line(returns[-1])}", flush=True)
        if failure is not None:
            raise failure
        return returns

    def checkpoint(self, *args, **kwargs):
        """What submitit's requeue signal handler pickles for the requeued job: the plugin's own
        launcher with this one's state (the printing is only the submitting process's). This class,
        pickled from inside a job, did not load in the submitting process (its result pickle)."""
        import submitit

        plain = SlurmLauncher.__new__(SlurmLauncher)
        plain.__dict__.update(self.__dict__)
        return submitit.helpers.DelayedSubmission(plain, *args, **kwargs)

    def _submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        """hydra-submitit-launcher's BaseSubmititLauncher.launch up to the submission (1.2.0)."""
        import submitit
        from hydra.core.singleton import Singleton

        params = self.params
        specific_init_keys = {"max_num_timeout"}
        init_keys = specific_init_keys | {"submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=params["submitit_folder"],
                                         **{f"{self._EXECUTOR}_{key}": value for key, value in params.items()
                                            if key in specific_init_keys})
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in base else f"{self._EXECUTOR}_{key}": value
                                      for key, value in params.items() if key not in init_keys})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        job_params = [(list(overrides), "hydra.sweep.dir", index, f"job_id_for_{index}", Singleton.get_state())
                      for index, overrides in enumerate(job_overrides, start=initial_job_idx)]
        return executor.map_array(self, *zip(*job_params))


def final_state(job, wait_s: float = 60) -> str:
    """The job's state as SLURM's accounting (sacct) records it once the job has ended: the result
    is there a moment before SLURM has finished the job (RUNNING, COMPLETING)."""
    deadline = time.monotonic() + wait_s
    state = job.get_info(mode="force").get("State", "UNKNOWN")
    while state in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED", "UNKNOWN") and time.monotonic() < deadline:
        time.sleep(2)
        state = job.get_info(mode="force").get("State", "UNKNOWN")
    return state


def job_result_line(job_return: JobReturn) -> str:
    """`30 steps, eval loss 8.38 -> 6.81, final model <dir>` from the run's summary.json, or where the job wrote."""
    output_dir = Path(job_return.cfg.get("output_dir") or job_return.working_dir)
    try:
        summary = json.loads((output_dir / "summary.json").read_text())
        return (f"{summary['steps']} steps, eval loss {summary['initial_eval_loss']:.4f} -> "
                f"{summary['final_eval_loss']:.4f}, final model {summary['final_model']}")
    except (OSError, ValueError, KeyError, TypeError):
        return f"output in {output_dir}"
