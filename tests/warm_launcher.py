"""`python -m launcher` for the test suite without its 4-5 s of imports per run.

One server process imports torch, transformers, datasets and hydralm once; each run is a fork of
it that sets the run's working directory, argv and output files and then executes
`python -m launcher` (or a wrapper script, tests/kill_in_save.py) exactly as a fresh interpreter
would from there: the same `launcher/__main__.py`, the same exit codes and signals.

A fork inherits what the imports read from the environment (Hugging Face's offline and cache
variables, OpenMP's thread count), so conftest.run_launcher uses the server only for a run whose
environment is the server's own; any other run starts a fresh interpreter. Set
HYDRALM_TEST_COLD=1 to start a fresh interpreter for every run.

Protocol (one JSON object a line): the client writes {"argv", "cwd", "stdout", "stderr",
"module" or "script"}; the server answers {"pid"} when the fork started and {"pid", "returncode"} when it
ended. One run at a time.
"""

import json
import os
import runpy
import sys
import traceback


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


def only_thread() -> bool:
    """A fork copies only the forking thread: no Python thread may be running. (Native ones,
    OpenMP's pool and pyarrow's allocator, reset themselves in a fork, as they do in the
    DataLoader's and datasets' forked workers.)"""
    import threading

    return threading.active_count() == 1


def run_child(request: dict) -> int:
    """In the forked child: become `python -m MODULE ARGV` (or `python SCRIPT ARGV`) in cwd."""
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
    import atexit

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
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    warm_up()
    print(json.dumps({"ready": only_thread()}), flush=True)
    serve()
