import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from warm_launcher import WarmLauncher

import launcher.schema  # noqa: F401  (registers the schema the config tree names)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


@pytest.fixture(scope="session", autouse=True)
def _session_environment(tmp_path_factory):
    """One preprocessing cache for the whole session (subprocesses inherit it), and one thread
    count for every process: results are bit-equal across processes only at the same count
    (kernels split their work by thread), and a process sized by its CPU affinity at start
    could otherwise get another count than the run it is compared with. Runs in this
    environment start warm (WarmLauncher)."""
    import torch

    os.environ["HYDRALM_CACHE"] = str(tmp_path_factory.mktemp("hydralm-cache"))
    os.environ.setdefault("WANDB_MODE", "offline")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pytest -n N: the cores are shared
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    WarmLauncher.base_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    yield
    WarmLauncher.close()


def final_weights(output_dir, file="model.safetensors") -> dict:
    """The tensors of a run's final-model (`adapter_model.safetensors` for LoRA adapters)."""
    from safetensors.torch import load_file

    return load_file(Path(output_dir) / "final-model" / file)


def assert_same_weights(actual: dict, expected: dict) -> None:
    """Bit-equal: the same tensor names, each tensor torch.equal."""
    import torch

    assert actual.keys() == expected.keys()
    differing = sorted(name for name in expected if not torch.equal(actual[name], expected[name]))
    if differing:  # what a failure says: how many elements of the first tensor, by how much, where
        first = differing[0]
        differ = actual[first] != expected[first]
        largest = (actual[first].double() - expected[first].double()).abs().max().item()
        rows = differ.flatten(1).any(1).nonzero().flatten().tolist() if differ.dim() > 1 else []
        raise AssertionError(f"{first}: {int(differ.sum())} of {differ.numel()} elements differ (largest by "
                             f"{largest:.3g}; rows {rows[:10]}); differing tensors: {differing}")


def compose_config(overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def training_parts(cfg, world):
    """What a run trains with, built and seeded as the Trainer builds them, for in-process tests
    of single steps: (tokenizer, LanguageModeling task, an iterator of train batches, model,
    optimizer over the trainable parameters)."""
    from launcher.data.loaders import train_loader
    from launcher.distributed import seed_everything
    from launcher.model.modeling import load_tokenizer
    from launcher.training.optim import build_optimizer
    from launcher.training.trainer import build_training_model
    from tasks.train import LanguageModeling

    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    task = LanguageModeling(cfg)
    loader = train_loader(task.datasets(tokenizer, world)["train"], cfg, world, task.collator(tokenizer))
    model = build_training_model(cfg, tokenizer, world)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, cfg.train.precision)
    return tokenizer, task, iter(loader), model, optimizer


def run_launcher(args, cwd, timeout=600, env=None):
    """`python -m launcher ARGS` in cwd; returns the CompletedProcess."""
    return run_python(["-m", "launcher", *args], cwd, timeout, env)


def run_launcher_killed_in_save(step, args, cwd, timeout=600):
    """`python -m launcher ARGS` SIGKILLed inside the save of step `step` (tests/kill_in_save.py)."""
    return run_python([str(ROOT / "tests" / "kill_in_save.py"), str(step), *args], cwd, timeout)


def run_python(command, cwd, timeout=600, env=None):
    """`python COMMAND` (`-m MODULE ARGS` or `SCRIPT ARGS`) in cwd: a fork of the warm server
    (tests/warm_launcher.py) when this run's environment allows, else a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    server = WarmLauncher.for_env(env)
    if server is not None:
        return server.run(command, cwd, env, timeout)
    return subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: its counts go to the controller
        session.config.workeroutput["warm_launcher_counts"] = dict(WarmLauncher.counts)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    WarmLauncher.counts.update(getattr(node, "workeroutput", {}).get("warm_launcher_counts", {}))


def pytest_terminal_summary(terminalreporter):
    if WarmLauncher.counts:
        counts = ", ".join(f"{count} {how}" for how, count in WarmLauncher.counts.most_common())
        terminalreporter.write_line(f"python -m launcher runs (tests/warm_launcher.py): {counts}")


def assert_rejected_before_any_work(overrides, message, tmp_path):
    """run_task raises one ConfigError containing `message`, and nothing is written."""
    from launcher.cli.app import run_task
    from launcher.errors import ConfigError

    cfg = compose_config([*overrides, f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError) as err:
        run_task(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


# A short schedule for end-to-end runs: few steps, small eval.
QUICK = ["train.max_steps=4", "train.logging_steps=2", "train.max_eval_batches=2"]


def run_in_fresh_python(argv, cwd):
    """`hydralm ARGV` in a fresh interpreter; its stdout ends with `EXIT <code>` and TORCH_IMPORTED
    or NO_TORCH, for tests of what a command imports."""
    code = (
        f"import sys; from launcher.cli.app import main; sys.argv = ['hydralm', *{list(argv)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    print('EXIT', exit.code)\n"
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)


def pack(docs, spec):
    """Every row the packer makes of `docs` in one table (its streaming use, in one go)."""
    import pyarrow as pa

    from launcher.data.packing import Packer

    packer = Packer(spec)
    return pa.concat_tables([packer.add(docs), packer.finish()])
