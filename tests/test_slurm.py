"""SLURM through `cluster=local`: a real cluster on this machine (tests/slurm_cluster.py).

Jobs: a single job, a 2-point sweep, an Optuna search whose 2 trials run in parallel, a 2-node job
whose ranks form one process group, and a job that gets the time-limit signal mid-training,
requeues itself and ends with the weights of the uninterrupted single job. Requests the partition
cannot satisfy fail before anything is queued.
"""

import json
import os
import subprocess
import sys

import optuna
import pytest
from conftest import ROOT, run_launcher
from omegaconf import OmegaConf
from safetensors.torch import load_file
from slurm_cluster import LocalSlurm

from launcher.cli.cluster import check_request, parse_sinfo
from launcher.errors import ConfigError

SMALL = ["train.max_seq_len=64", "data.train_bs=2", "data.eval_bs=4", "train.max_eval_batches=1",
         "train.max_steps=8", "train.logging_steps=2"]
JOB_TIMEOUT = 420


@pytest.fixture(scope="module")
def slurm():
    reason = LocalSlurm.available()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm()
    cluster.start()
    yield cluster
    cluster.stop()


def submit(args, sweep_dir, cwd):
    return run_launcher(["cluster=local", *SMALL, *args, f"hydra.sweep.dir={sweep_dir}"], cwd=cwd,
                        timeout=JOB_TIMEOUT)


def job_ids(sweep_dir) -> list[str]:
    """The SLURM jobs of a sweep: submitit makes a folder per job (and per array element) at submission."""
    folder = sweep_dir / ".submitit"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def job_logs(sweep_dir) -> str:
    return "".join(p.read_text(errors="replace") for p in (sweep_dir / ".submitit").rglob("*_log.*"))


@pytest.fixture(scope="module")
def single_job(slurm, tmp_path_factory):
    sweep = tmp_path_factory.mktemp("single")
    result = submit([], sweep, cwd=sweep)
    assert result.returncode == 0, result.stderr + job_logs(sweep)
    return sweep


@pytest.mark.slow
def test_a_single_job_trains_and_exports(single_job):
    summary = json.loads((single_job / "0" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert (single_job / "0" / "final-model" / "model.safetensors").is_file()
    (job_id,) = job_ids(single_job)
    LocalSlurm.wait_for(lambda: LocalSlurm.job_field(job_id, "JobState") == "COMPLETED", 60, "the job to complete")


@pytest.mark.slow
def test_a_sweep_submits_one_job_per_point(slurm, tmp_path):
    result = submit(["optimizer.lr=1e-3,3e-3", "train.max_steps=2"], tmp_path / "sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + job_logs(tmp_path / "sweep")
    for point, lr in (("0", 1e-3), ("1", 3e-3)):
        job_dir = tmp_path / "sweep" / point
        assert OmegaConf.load(job_dir / ".hydra" / "config.yaml").optimizer.lr == lr
        assert json.loads((job_dir / "summary.json").read_text())["steps"] == 2
    array_job = job_ids(tmp_path / "sweep")[0]  # one array job, one element per point
    assert job_ids(tmp_path / "sweep") == [array_job, f"{array_job}_0", f"{array_job}_1"]


@pytest.mark.slow
def test_an_optuna_search_runs_its_trials_in_parallel_jobs(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    result = submit(["hparams_search=lr_warmup", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                     "train.max_steps=2"], sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + job_logs(sweep)
    study = optuna.load_study(study_name="hydralm", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in study.trials:  # each job handed the sweeper its run's final eval loss
        summary = json.loads((sweep / str(trial.number) / "summary.json").read_text())
        assert summary["steps"] == 2 and trial.value == summary["final_eval_loss"]
    array_job = job_ids(sweep)[0]  # both trials in one array job, running at the same time
    assert job_ids(sweep) == [array_job, f"{array_job}_0", f"{array_job}_1"]
    (start0, end0), (start1, end1) = ((LocalSlurm.job_field(f"{array_job}_{i}", "StartTime"),
                                       LocalSlurm.job_field(f"{array_job}_{i}", "EndTime")) for i in (0, 1))
    assert start0 < end1 and start1 < end0, (start0, end0, start1, end1)


@pytest.mark.slow
def test_a_two_node_job_is_one_process_group(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    result = submit(["cluster.nodes=2", "sharding=full_shard", "train.max_steps=2", "train.checkpointing_enabled=true",
                     "train.save_steps=2"], sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + job_logs(sweep)
    checkpoint = sweep / "0" / "checkpoints" / "checkpoint-00000002"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2  # the FSDP mesh spans both nodes' ranks
    assert {"__0_0.distcp", "__1_0.distcp", "rank-0.json", "rank-1.json"} <= {p.name for p in checkpoint.iterdir()}
    (job_id,) = job_ids(sweep)
    assert LocalSlurm.job_field(job_id, "NodeList") == "n[1-2]"


@pytest.mark.slow
def test_the_time_limit_signal_checkpoints_requeues_and_resumes_to_the_same_weights(slurm, single_job, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "launcher", "cluster=local", *SMALL, f"hydra.sweep.dir={sweep}"]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        metrics = sweep / "0" / "metrics.jsonl"
        LocalSlurm.wait_for(lambda: metrics.is_file() and "train_loss" in metrics.read_text(), 240, "training to start")
        (job_id,) = job_ids(sweep)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        LocalSlurm.wait_for(lambda: LocalSlurm.job_field(job_id, "Restarts") == "1"
                            and LocalSlurm.job_field(job_id, "JobState") == "PENDING", 120, "the requeue")
        # SLURM holds a requeued job for 2 minutes before it is eligible; the test cluster need not wait.
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, timeout=30)
        output, _ = launcher.communicate(timeout=JOB_TIMEOUT)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output + job_logs(sweep)
    logs = job_logs(sweep)
    assert "stopping for requeue after the checkpoint" in logs and "hydralm: resuming from" in logs
    expected = load_file(single_job / "0" / "final-model" / "model.safetensors")
    actual = load_file(sweep / "0" / "final-model" / "model.safetensors")
    assert all(actual[name].equal(expected[name]) for name in expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster.nodes=3"], "cluster.nodes=3 exceeds the partition with 2 node(s)"),
        (["cluster.gpus_per_node=1"], "cluster.gpus_per_node=1 exceeds the 0 GPUs per node"),
        (["cluster.mem_gb=100000"], "cluster.mem_gb=100000 exceeds the"),
        (["cluster.time_min=1", "cluster.signal_delay_s=60"], "cluster.signal_delay_s=60 must be shorter"),
        (["cluster.partition=gpu"], "cluster.partition=gpu is not a partition of this cluster; valid choices: debug"),
    ],
)
def test_impossible_requests_fail_before_anything_is_queued(slurm, tmp_path, overrides, message):
    result = run_launcher(["cluster=local", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path,
                          timeout=120)
    assert result.returncode == 2 and f"hydralm: error: {message}" in result.stderr, result.stderr
    assert job_ids(tmp_path / "sweep") == []


def test_sinfo_parsing_counts_gpus_and_finds_the_default_partition():
    text = "a40*|gpu001|32|172000|gpu:a40:4(S:0-1)\na40*|gpu002|32|172000|gpu:a40:4\ncpu|cpu001|64|256000+|(null)\n"
    nodes = parse_sinfo(text, None)
    assert [n["gpus"] for n in nodes] == [4, 4] and nodes[0]["mem_mb"] == 172000
    launcher = OmegaConf.create({"timeout_min": 60, "signal_delay_s": 120, "nodes": 2, "tasks_per_node": 4,
                                 "cpus_per_task": 8, "mem_gb": 160, "gpus_per_node": 4})
    check_request(launcher, nodes)
    with pytest.raises(ConfigError, match="cluster.tasks_per_node x cluster.cpus_per_task = 36 CPUs exceeds"):
        check_request(OmegaConf.merge(launcher, {"cpus_per_task": 9}), nodes)
    assert parse_sinfo(text, "cpu")[0]["mem_mb"] == 256000
