"""A stopped rank (SIGSTOP) no longer holds the others for torch's half hour: the watchdog
(launcher/distributed.py) stops them within sharding.collective_timeout_s, naming the rank."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 4

# Each rank joins the group through launcher.distributed (gloo, CPU); rank 1 then stops itself
# (SIGSTOP, as a frozen process would) while rank 0 waits for it in an all_reduce.
RANK = f"""
import os, signal, torch, torch.distributed as dist
from launcher.distributed import distributed
with distributed("gloo", collective_timeout_s={TIMEOUT_S}) as world:
    dist.all_reduce(torch.ones(1))  # both ranks alive and talking
    print("joined", flush=True)
    if world.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    dist.all_reduce(torch.ones(1))
print("finished", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(rank: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-c", RANK], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_a_stopped_rank_is_named_and_the_others_stop_within_the_timeout():
    port = _free_port()
    ranks = [_start(0, port), _start(1, port)]
    try:
        assert ranks[0].stdout.readline() == "joined\n"
        joined = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - joined
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode == 1
    lines = [line for line in stderr.splitlines() if line.startswith("hydralm")]
    assert lines == [f"hydralm: error: rank 1 stopped responding (no heartbeat for {TIMEOUT_S} s, "
                     f"sharding.collective_timeout_s={TIMEOUT_S}; stopped, frozen or its host hung): rank 0 stops "
                     f"instead of waiting for it in a collective"], stderr
    assert TIMEOUT_S - 1 <= waited <= TIMEOUT_S + 10  # within the timeout, not torch's half hour


@pytest.mark.slow
def test_ranks_that_finish_apart_are_not_called_stopped():
    """A rank that left the group cleanly is not waited for: rank 0 working alone longer than the
    timeout after rank 1 finished ends normally."""
    code = RANK.replace("os.kill(os.getpid(), signal.SIGSTOP)", "pass").replace(
        'print("finished", flush=True)', f'import time\nif world.rank == 0: time.sleep({TIMEOUT_S} * 2)\nprint("finished", flush=True)')
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [process.communicate(timeout=60) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs
    assert all(out.endswith("finished\n") for out, _ in outputs)
