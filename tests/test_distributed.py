"""Multi-process FSDP2 on CPU (gloo, torchrun): every strategy matches the single-process run.

Same seed, same global batch (world size x data.train_bs = 8) and the same data order, so the
train loss after k optimizer steps and the exported weights must agree up to float reordering.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_config
from safetensors.torch import load_file

from launcher.cli.app import run_task

STEPS = ["train.max_steps=4", "train.logging_steps=2", "train.max_eval_batches=1", "data.eval_bs=4"]
GLOBAL_BATCH = 8
LOSS_RTOL = 1e-5  # relative, train loss at steps 2 and 4
WEIGHT_ATOL = 2e-4  # absolute, every exported tensor after 4 AdamW steps at lr 2e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, args, cwd, nnodes=1, timeout=600):
    """Start `nnodes` torchrun agents (two 'nodes' on this machine when nnodes=2) and wait."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node}",
             f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}",
             "-m", "launcher", *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in range(nnodes)
    ]
    results = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=timeout)
            results.append((agent.returncode, out, err))
    finally:
        for agent in agents:
            agent.kill()
    return results


def _train_losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _weights(out_dir):
    return load_file(out_dir / "final-model" / "model.safetensors")


def _assert_same_run(out_dir, reference_dir):
    assert _train_losses(out_dir) == pytest.approx(_train_losses(reference_dir), rel=LOSS_RTOL)
    expected = _weights(reference_dir)
    actual = _weights(out_dir)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run everything is compared with."""
    out = tmp_path_factory.mktemp("reference")
    summary = run_task(compose_config([*STEPS, f"data.train_bs={GLOBAL_BATCH}", f"output_dir={out}"]))
    return out, summary


@pytest.mark.slow
@pytest.mark.parametrize(
    "sharding,extra",
    [("no_shard", []), ("full_shard", []), ("shard_grad_op", ["sharding.low_cpu_mem_usage=true"]),
     # the head and loss in chunks (the last one short) through FSDP2's root, against the full logits
     ("full_shard", ["train.loss=chunked_cross_entropy", "train.loss_chunk_size=100"])],
    ids=["no_shard", "full_shard", "shard_grad_op-low_cpu_mem_usage", "full_shard-chunked_loss"],
)
def test_two_processes_match_one(sharding, extra, reference, tmp_path):
    out = tmp_path / "run"
    args = [*STEPS, f"sharding={sharding}", *extra, f"data.train_bs={GLOBAL_BATCH // 2}", f"output_dir={out}"]
    [(code, _, err)] = _torchrun(2, args, cwd=tmp_path)
    assert code == 0, err
    _assert_same_run(out, reference[0])
    summary = json.loads((out / "summary.json").read_text())
    full = reference[1]["parameter_bytes_per_rank"]
    if sharding == "no_shard":
        assert summary["parameter_bytes_per_rank"] == full
    else:  # every parameter is split in two (rows of odd-sized tensors round up)
        assert 0.5 * full <= summary["parameter_bytes_per_rank"] <= 0.51 * full


@pytest.mark.slow
def test_hybrid_shard_on_two_nodes_of_two(reference, tmp_path):
    out = tmp_path / "run"
    args = [*STEPS, "sharding=hybrid_shard", f"data.train_bs={GLOBAL_BATCH // 4}", f"output_dir={out}"]
    results = _torchrun(2, args, cwd=tmp_path, nnodes=2)
    for code, _, err in results:
        assert code == 0, err
    _assert_same_run(out, reference[0])
    summary = json.loads((out / "summary.json").read_text())
    # shard groups of 2 (a node), replicated across the 2 nodes
    assert 0.5 * reference[1]["parameter_bytes_per_rank"] <= summary["parameter_bytes_per_rank"]
    assert summary["parameter_bytes_per_rank"] <= 0.51 * reference[1]["parameter_bytes_per_rank"]


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
@pytest.mark.parametrize(
    "overrides",
    [
        [f"data.train_bs={GLOBAL_BATCH // 2}", "train.gradient_accumulation_steps=2"],
        [f"data.train_bs={GLOBAL_BATCH}", "train.use_activation_checkpointing=true"],
        [f"data.train_bs={GLOBAL_BATCH}", "train.use_activation_checkpointing=true",
         "train.activation_checkpointing_every=2"],
    ],
    ids=["accumulation", "activation-checkpointing", "selective-checkpointing"],
)
def test_accumulation_and_checkpointing_change_nothing_but_cost(overrides, reference, tmp_path):
    run_task(compose_config([*STEPS, *overrides, f"output_dir={tmp_path}"]))
    _assert_same_run(tmp_path, reference[0])


@pytest.mark.slow
def test_bad_combination_fails_on_every_rank_without_hanging(tmp_path):
    """Checks run before the process group forms, so no rank waits for another."""
    args = ["sharding=hybrid_shard", "sharding.shard_group_size=2", f"output_dir={tmp_path / 'out'}"]
    codes, errors = _run_ranks(3, args, tmp_path, timeout=180)
    message = "sharding.strategy=HYBRID_SHARD needs the world size (3) to be divisible by sharding.shard_group_size (2"
    assert codes == [2, 2, 2]
    assert f"hydralm: error: {message}" in errors[0]
    for rank in (1, 2):
        assert f"hydralm: error (rank {rank}): {message}" in errors[rank]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()

    [(code, _, err)] = _torchrun(3, args, cwd=tmp_path, timeout=180)  # and torchrun reports it
    assert code != 0 and message in err


@pytest.mark.slow
def test_an_error_found_by_rank_0_while_preprocessing_reaches_every_rank(tmp_path):
    """Only rank 0 preprocesses; a bad file it finds is every rank's one-line error, not a hang."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    args = ["data=files", f"data.load_path={data}", f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'out'}"]
    codes, errors = _run_ranks(2, args, tmp_path, timeout=240)
    message = f"{data}: data.data_field=text is not a column of the dataset; columns: question, answer"
    assert codes == [2, 2], errors
    assert f"hydralm: error: {message}" in errors[0]
    assert f"hydralm: error (rank 1): {message}" in errors[1]
    assert "Traceback" not in errors[0] + errors[1]


def _run_ranks(world_size, args, cwd, timeout):
    """`world_size` ranks of `python -m launcher ARGS`, started directly (no torchrun); their exit
    codes and stderr."""
    port = str(_free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "launcher", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank),
                            "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
        )
        for rank in range(world_size)
    ]
    try:
        errors = [rank.communicate(timeout=timeout)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    return [rank.returncode for rank in ranks], errors
