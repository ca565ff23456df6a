"""Preemption inside a SLURM job: submitit's requeue signal becomes a checkpoint at the next
optimizer-step boundary, then a requeue.

On the signal submitit forwards (USR2 by default, `cluster.signal_delay_s` before the time limit,
or on preemption) every rank finishes its step, the ranks write a checkpoint together, and rank 0
hands over to submitit's own handler, which resubmits the same Hydra job and requeues it; the
requeued job finds the checkpoint in the same output directory (`resume=auto`) and continues
exactly where it stopped. Outside a submitit job nothing is installed.
"""

import os
import signal
import sys
from typing import Optional

import torch
import torch.distributed as dist

from launcher.distributed import World, barrier, in_submitit_job


def requeue_signal() -> signal.Signals:
    """The signal submitit forwards before a time limit (its documented SUBMITIT_PREEMPT_SIGNAL)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class Preemption:
    def __init__(self, world: World):
        self.world = world
        self.received: Optional[int] = None
        self.submitit_handler = None
        if in_submitit_job():
            signum = requeue_signal()
            self.submitit_handler = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def _record(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Collective when active: true on every rank once any rank got the signal."""
        if self.submitit_handler is None:
            return False
        flag = torch.tensor([0 if self.received is None else 1], device=self.world.device)
        if self.world.size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self) -> None:
        """After the checkpoint: rank 0 lets submitit resubmit the job and requeue it; it exits."""
        barrier()
        print(f"hydralm: rank {self.world.rank} stopping for requeue after the checkpoint", flush=True)
        if self.world.is_main:
            self.submitit_handler(self.received or requeue_signal(), None)  # requeues, then sys.exit
        sys.exit(-1)
