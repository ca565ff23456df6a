"""`python tests/kill_in_save.py STEP ARGS...`: `python -m launcher ARGS`, SIGKILLed inside the save
of step STEP, after the shards and trainer_state.json are written and before the checkpoint is
complete (its COMPLETE marker and the swap into place: launcher.store.atomic.commit).

A test-side wrapper, so the production save path carries no test hook.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.store import atomic  # noqa: E402
from launcher.store.run_dir import checkpoint_dir  # noqa: E402

step, sys.argv = int(sys.argv[1]), [sys.argv[0], *sys.argv[2:]]
commit = atomic.commit


def commit_unless_killed(staging, target, *args, **kwargs):
    if Path(target).name == checkpoint_dir(Path(), step).name:
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(staging, target, *args, **kwargs)


atomic.commit = commit_unless_killed

from launcher.cli.app import main  # noqa: E402

main()
