"""The command line as a new user meets it: one-line errors with the closest valid names, checks
before Hydra makes any directory (for every sweep point before anything is queued), task=validate,
--help, the job log, and secrets kept off the console."""

import os

import pytest
from conftest import CONF_DIR, QUICK, run_in_fresh_python, run_launcher

pytestmark = pytest.mark.slow  # every test here starts a subprocess

SECRET = "hydralm-test-secret-5f2c9a"
WANDB_KEY = f"+logger.wandb.settings.api_key={SECRET}"
# A job that passes every check and fails inside its task function (no model, no torch).
FAILING_JOB = ["task=report", "task.check=null", "task.fn=json.loads"]


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hydralm: error: "), result.stderr
    return lines[0].removeprefix("hydralm: error: ")


@pytest.mark.parametrize(
    "args,message",
    [
        (["train.epoch=3"], "train.epoch is not a key of train; did you mean train.epochs?"),
        (["trian.epochs=3"], "trian is not a key of the config; did you mean train?"),
        (["optimizer=adamx"], "optimizer=adamx is not an option of optimizer; choose one of: adamw, sgd; "
                              "did you mean adamw?"),
        (["optimizer.lrr=0.1"], "optimizer.lrr is not a key of optimizer; did you mean optimizer.lr? "
                                "(+optimizer.lrr=... adds it)"),
        (["logger.wandb.project=x"], "logger.wandb is not a key of logger (select it first: logger=wandb)"),
        (["train.epochs=abc"], "train.epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        (["train.use_mp=true"], "train.use_mp is not a key of train; use train.precision=mixed (train.use_mp=true) "
                                "or train.precision=fp32 (docs/precision.md)"),
    ],
)
def test_a_misspelt_key_option_or_type_is_one_line_with_the_closest_names(args, message, tmp_path):
    result = run_launcher([*args, "--cfg", "job"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert _one_error_line(result) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["train.seed=-1"],  # used to fail in the job, after Hydra made outputs/<date>/<time>/
        ["output_dir=''"],  # used to write .hydra/ into the current directory
        ["-m", "train.seed=1,-1", *QUICK],  # used to train point #0, then fail point #1
    ],
)
def test_a_run_refused_by_its_checks_leaves_no_directory(args, tmp_path):
    result = run_launcher(args, cwd=tmp_path)
    assert result.returncode == 2
    assert "train.seed=-1 must be in [0, 2**32 - 1]" in _one_error_line(result) or "output_dir=''" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, multirun/, .hydra/ or hydralm.log


def test_validate_checks_every_sweep_point_and_runs_nothing(tmp_path):
    bad = run_launcher(["-m", "task=validate", "optimizer.lr=1e-3,abc,2e-3"], cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stdout.splitlines() == ["hydralm: ok: #0 task=validate optimizer.lr=0.001"]
    assert _one_error_line(bad) == ("sweep point #1 (task=validate optimizer.lr=abc): optimizer.lr='abc' does not "
                                    "match torch.optim.AdamW's lr: float | torch.Tensor")
    good = run_launcher(["-m", "task=validate", "train.seed=1,2", "peft=none,lora"], cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines() == [f"hydralm: ok: #{i} task=validate train.seed={s} peft={p}"
                                        for i, (s, p) in enumerate([(1, "none"), (1, "lora"), (2, "none"), (2, "lora")])]
    single = run_launcher(["task=validate", "optimizer=sgd"], cwd=tmp_path)
    assert single.returncode == 0 and single.stdout.strip() == "hydralm: ok: task=validate optimizer=sgd"
    assert list(tmp_path.iterdir()) == []


def test_validate_refuses_a_bad_path_without_importing_torch(tmp_path):
    result = run_in_fresh_python(["task=validate", "output_dir=/proc/x"], tmp_path)
    assert "output_dir=/proc/x cannot be written" in result.stderr
    assert result.stdout.split() == ["EXIT", "2", "NO_TORCH"]


def test_a_bad_sweep_point_stops_the_submission_before_sbatch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "sbatch-called"
    scripts = {"sbatch": f"#!/bin/sh\ntouch {marker}\necho 'Submitted batch job 4242'\n",
               "sinfo": "#!/bin/sh\necho 'debug*|n1|16|64000|(null)'\n"}
    for name, script in scripts.items():
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    result = run_launcher(["-m", "hydra/launcher=submitit_slurm", "optimizer.lr=1e-3,-1",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, timeout=180,
                          env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 2
    assert _one_error_line(result) == ("sweep point #1 (optimizer.lr=-1): "
                                       "optimizer.lr=-1 is refused by torch.optim.AdamW: Invalid learning rate: -1")
    assert not marker.exists() and not (tmp_path / "sweep").exists()


def test_help_lists_the_tasks_groups_and_examples(tmp_path):
    result = run_launcher(["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    tasks = result.stdout.split("== Tasks (task=...) ==")[1].split("==")[0]
    for task in sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml")):
        assert f"\n  {task} " in tasks, task
    assert "optimizer: adamw, sgd" in result.stdout and "peft: lora, none" in result.stdout
    examples = result.stdout.split("== Examples ==")[1]
    assert examples.count("python -m launcher") >= 5
    assert "_target_" not in result.stdout  # the usage, not a dump of the config


def test_the_job_log_keeps_the_error(tmp_path):
    refused = tmp_path / "refused"  # a ConfigError raised inside the job, after Hydra made the run directory
    result = run_launcher(["task=report", "task.check=null", "task.fn=launcher.cli.report.check_report",
                           f"output_dir={refused}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert line.startswith("report.dir must be set") and line in (refused / "hydralm.log").read_text()
    crashed = tmp_path / "crashed"
    result = run_launcher([*FAILING_JOB, f"output_dir={crashed}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "TypeError: the JSON object must be str" in result.stderr
    log = (crashed / "hydralm.log").read_text()
    assert "Traceback (most recent call last)" in log and "TypeError: the JSON object must be str" in log


@pytest.mark.parametrize(
    "args,shown",
    [
        # Hydra's "To append to your config use +<override>" echo
        (["logger=wandb", WANDB_KEY.lstrip("+"), "--cfg", "job"], "logger.wandb.settings is not a key of logger.wandb"),
        # the composed config Hydra prints
        (["logger=wandb", WANDB_KEY, "--cfg", "job"], "api_key: ***"),
        # a failing job: "Error executing job with overrides: [...]"
        ([*FAILING_JOB, "logger=wandb", WANDB_KEY], "'+logger.wandb.settings.api_key=***'"),
        # a sweep's launch ("#0 : <overrides>") and its failing job
        (["-m", *FAILING_JOB, "logger=wandb", WANDB_KEY, "train.seed=1,2"], "#0 : task=report"),
        # a refused sweep point, and task=validate's lines
        (["-m", "task=validate", "logger=wandb", WANDB_KEY, "train.seed=1,-1"], "api_key=*** train.seed=-1): train.seed"),
    ],
)
def test_secret_values_never_reach_the_console(args, shown, tmp_path):
    result = run_launcher(args, cwd=tmp_path, timeout=300)
    console = result.stdout + result.stderr
    assert shown in console, console[-3000:]
    assert SECRET not in console
