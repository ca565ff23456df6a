"""Stop signals: SIGINT (Ctrl-C), SIGTERM and, inside a SLURM job, submitit's requeue signal
become a checkpoint at the next optimizer-step boundary, then a clean stop (or a requeue).
docs/runs.md ("Stopping and preemption") says what happens on each signal.

- SIGINT, and SIGTERM outside SLURM: the ranks finish their step and write a checkpoint together
  (when `train.checkpointing_enabled`), and the run stops with one line and exit code
  128 + the signal's number. A second Ctrl-C exits at once, without a checkpoint.
- SIGTERM inside a SLURM job (preemption, `scontrol requeue`, `scancel`, the time limit itself):
  a checkpoint, even with checkpointing off, then the same stop. SLURM requeues a preempted or
  requeued job itself; the requeued job finds the checkpoint in its output directory (`resume=auto`).
- The requeue signal (USR2 by default, `cluster.signal_delay_s` before the time limit): a
  checkpoint (even with checkpointing off), then submitit's own handler requeues the job.

submitit's job process (submitit/core/job_environment.py, `JobEnvironment._handle_signals`)
installs a SIGTERM handler that only logs "Bypassing signal SIGTERM": SLURM would then kill the
job KillWait seconds later, mid-step, without a checkpoint. `StopSignals` replaces it (and the
requeue signal's) for the training loop and puts it back after, so hydralm's handler wins.

The ranks must stop at the same step, without waiting for the device every step: a handler only
records the signal; at each step boundary the ranks start an asynchronous all-reduce of what
they received on a CPU (gloo) group and act on the one started a step earlier, so every rank
reads the same answer at the same step and the exchange has a whole step to complete.
"""

import os
import signal
import sys
from typing import Optional

import torch
import torch.distributed as dist

from launcher.distributed import World, barrier, in_submitit_job
from launcher.errors import RunStopped


def requeue_signal() -> signal.Signals:
    """The signal submitit forwards before a time limit (its documented SUBMITIT_PREEMPT_SIGNAL)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class StopSignals:
    """Installed for the training loop (a context manager); the previous handlers come back after."""

    def __init__(self, world: World):
        self.world = world
        self.received: Optional[int] = None
        self.in_slurm = in_submitit_job()
        self.handled = [signal.SIGINT, signal.SIGTERM] + ([requeue_signal()] if self.in_slurm else [])
        self.previous: dict = {}
        self.group = dist.new_group(backend="gloo") if world.size > 1 else None
        self.exchange = None  # (work, tensor) of the all-reduce started at the previous step boundary

    def __enter__(self) -> "StopSignals":
        self.previous = {signum: signal.signal(signum, self._record) for signum in self.handled}
        return self

    def __exit__(self, *exc) -> None:
        if self.exchange is not None:
            self.exchange[0].wait()
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            print("hydralm: interrupted again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = self.received or signum

    def at_step_boundary(self) -> Optional[int]:
        """The signal any rank had received by the previous boundary (every rank: the same answer
        at the same step), or None. Collective; never waits for the device."""
        if self.world.size == 1:
            return self.received
        agreed = None
        if self.exchange is not None:
            work, flag = self.exchange
            work.wait()
            agreed = int(flag) or None
        flag = torch.tensor(self.received or 0, dtype=torch.int64)
        self.exchange = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def saves(self, signum: int, checkpointing_enabled: bool) -> bool:
        """Inside a SLURM job the requeue signal and SIGTERM always checkpoint: the requeued job
        resumes from it."""
        return checkpointing_enabled or self.preempted(signum)

    def preempted(self, signum: int) -> bool:
        return self.in_slurm and signum in (signal.SIGTERM, requeue_signal())

    def requeues(self, signum: int) -> bool:
        """Only the requeue signal requeues from here; after SIGTERM SLURM requeues (or cancels) itself."""
        return self.in_slurm and signum == requeue_signal()

    def stop(self, signum: int, step: int, checkpoint) -> None:
        """After the checkpoint (if any): requeue, or stop with one line. Never returns."""
        barrier()
        if self.requeues(signum):
            print(f"hydralm: rank {self.world.rank} stopping for requeue after the checkpoint", flush=True)
            if self.world.is_main:
                self.previous[signum](signum, None)  # submitit's handler: requeues, then sys.exit
            sys.exit(-1)
        if checkpoint and self.preempted(signum):
            saved = f"saved {checkpoint}; a requeued job resumes from it"
        elif checkpoint:
            saved = f"saved {checkpoint}; the same command resumes from it"
        else:
            saved = "nothing saved (train.checkpointing_enabled=false)"
        raise RunStopped(f"stopped by {signal.Signals(signum).name} after step {step}: {saved}", 128 + signum)
