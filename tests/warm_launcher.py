"""`python -m launcher` for the test suite without its 4-5 s of imports per run.

One server process imports torch, transformers, datasets and hydralm once; each run is a fork of
it that takes the run's environment, working directory, argv and output files and then executes
`python -m launcher` (or a script: tests/kill_in_save.py) as a fresh interpreter would from
there: the same `launcher/__main__.py`, the same exit codes and signals
(tests/test_warm_launcher.py compares the two).

A fork keeps what the imports read from the environment (Hugging Face's offline and cache
variables, OpenMP's thread count, HOME), so a run is warm only when its environment equals the
server's in every variable but those read when a run needs them (RUNTIME_ONLY); any other run
starts a fresh interpreter. HYDRALM_TEST_COLD=1 starts a fresh interpreter for every run.

Protocol (one JSON object a line): the client writes {"id", "argv", "env", "cwd", "stdout",
"stderr", "module" or "script"}; the server answers {"id", "pid"} when the fork started and {"id",
"pid", "returncode"} when it ended. One run at a time; an answer to an earlier request (one whose
test was stopped by a timeout) is skipped.
"""

import atexit
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Read only when a run needs them, by modules the server does not import (wandb, submitit) or at
# run time (torch.distributed, hydralm's cache, Hydra's error mode; inductor's cache folders and the
# pointer its compiled code reads, which an in-process compile leaves set): a run may set them.
RUNTIME_ONLY = ("PYTEST_", "WANDB_", "SLURM_", "SUBMITIT_", "TORCHELASTIC_", "HYDRALM_", "HYDRA_", "RANK",
                "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
NOT_IMPORTED = ("wandb", "submitit")  # what RUNTIME_ONLY relies on


def import_time_env(env: dict) -> dict:
    return {key: value for key, value in env.items() if not key.startswith(RUNTIME_ONLY)}


# ---------------------------------------------------------------------- the client (conftest)


class WarmLauncher:
    """Started on first use with the session's environment (`base_env`); `run` is one fork."""

    base_env: dict = {}  # set by conftest's session fixture
    server: "WarmLauncher | None" = None
    counts: Counter = Counter()  # warm runs, and cold ones by the variable that made them cold

    @classmethod
    def for_env(cls, env: dict) -> "WarmLauncher | None":
        if os.environ.get("HYDRALM_TEST_COLD"):
            return None
        differing = sorted(set(import_time_env(env).items()) ^ set(import_time_env(cls.base_env).items()))
        if differing:
            cls.counts[f"cold ({differing[0][0]})"] += 1
            return None
        if cls.server is None:
            cls.server = cls(cls.base_env)
        if not cls.server.ready:
            cls.counts[f"cold ({cls.server.why_not})"] += 1
            return None
        cls.counts["warm"] += 1
        return cls.server

    def __init__(self, env: dict):
        self.process = subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.pending = b""  # answers read from the pipe, not yet returned (the pipe is read unbuffered)
        self.requests = 0
        try:
            self.ready = self._answer(None, 300)["ready"]
            self.why_not = "the server could not fork safely"
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as err:  # the suite runs cold
            self.ready, self.why_not = False, f"the server did not start: {err}"

    def run(self, command: list, cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        module, script = (command[1], None) if command[0] == "-m" else (None, command[0])
        argv = command[2:] if module else command[1:]
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            self.requests += 1
            request = {"id": self.requests, "argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out),
                       "stderr": str(err), "module": module, "script": script}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = self._answer(self.requests, 60)["pid"]
            try:
                returncode = self._answer(self.requests, timeout)["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._answer(self.requests, 60)
                raise subprocess.TimeoutExpired([sys.executable, *command], timeout) from None
            return subprocess.CompletedProcess([sys.executable, *command], returncode, out.read_text(), err.read_text())

    def _answer(self, request: "int | None", timeout: float) -> dict:
        """The server's next answer to `request`."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self.pending:
                ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise subprocess.TimeoutExpired("tests/warm_launcher.py", timeout)
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"tests/warm_launcher.py ended (exit {self.process.wait()})")
                self.pending += chunk
            line, self.pending = self.pending.split(b"\n", 1)
            answer = json.loads(line)
            if answer.get("id") == request:
                return answer

    @classmethod
    def close(cls) -> None:
        if cls.server is not None:
            cls.server.process.kill()
            cls.server.process.wait()
            cls.server = None


# ---------------------------------------------------------------------- the server


def warm_up() -> None:
    """What a training run imports, once (the fork inherits it)."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from hydra.core.plugins import Plugins

    import launcher.cli.app  # noqa: F401
    import launcher.training.trainer  # noqa: F401
    import tasks.train  # noqa: F401

    Plugins.instance()  # Hydra's plugin discovery scans every installed plugin module


def fork_safe() -> bool:
    """A fork copies only the forking thread, so no Python thread may be running (native ones,
    OpenMP's pool and pyarrow's allocator, reset themselves in a fork, as they do in the
    DataLoader's and datasets' forked workers); and RUNTIME_ONLY holds only while the modules
    that read those variables at import are not imported yet."""
    import threading

    return threading.active_count() == 1 and not any(name in sys.modules for name in NOT_IMPORTED)


def run_child(request: dict) -> int:
    """In the forked child: become `python -m MODULE ARGV` (or `python SCRIPT ARGV`) in cwd."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    script, module = request.get("script"), request.get("module")
    sys.argv = [script or module, *request["argv"]]
    sys.path[0] = os.path.dirname(script) if script else request["cwd"]  # what python puts first
    try:
        if script:
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (what the interpreter would print and exit with)
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # logging.shutdown and every handler a run registered
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def serve() -> None:
    answers = sys.stdout  # the child's sys.stdout too: it writes to fd 1, its output file after dup2
    for line in iter(sys.stdin.readline, ""):
        request = json.loads(line)
        answers.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_child(request)
            finally:
                os._exit(code)
        answers.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"id": request["id"], "pid": pid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # not tests/: a child puts its own first (its cwd or script's folder)
    warm_up()
    print(json.dumps({"id": None, "ready": fork_safe()}), flush=True)
    serve()
