"""Logger plumbing that needs no training run: secret scrubbing and masking, the persistent wandb run id, tags."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose_config

from launcher.secrets import REDACTED, scrub
from launcher.training.loggers import wandb_init_kwargs


def test_scrub_redacts_secret_keys_only():
    config = {"logger": {"wandb": {"settings": {"api_key": "k1"}}}, "hub": {"hf_token": "t1", "password": "p1"},
              "model": {"pad_token_id": 3, "tokenizer": "dir"}, "data": {"add_bos_eos_tokens": True},
              "env": {"WANDB_API_KEY": "k2", "client_secret": "s1", "monkey": "ok"}}
    clean = scrub(config)
    assert clean["logger"]["wandb"]["settings"]["api_key"] == REDACTED
    assert clean["hub"] == {"hf_token": REDACTED, "password": REDACTED}
    assert clean["env"] == {"WANDB_API_KEY": REDACTED, "client_secret": REDACTED, "monkey": "ok"}
    assert clean["model"] == config["model"] and clean["data"] == config["data"]
    overrides = ["+hub.hf_token=t1", "optimizer.lr=1e-3,3e-3", "+a.api_key=k1,export.merge_lora=true,x.password=p1"]
    assert scrub(overrides) == ["+hub.hf_token=***", "optimizer.lr=1e-3,3e-3",
                                "+a.api_key=***,export.merge_lora=true,x.password=***"]


def test_wandb_run_id_is_kept_in_the_output_dir_so_a_requeued_job_resumes_the_run(tmp_path):
    cfg = compose_config(["logger=wandb", "+logger.wandb.notes=first try", "+logger.wandb.settings.api_key=k1"])
    first = wandb_init_kwargs(cfg, tmp_path)
    again = wandb_init_kwargs(cfg, tmp_path)
    assert first["id"] == again["id"] == (tmp_path / "wandb_run_id").read_text().strip()
    assert first["resume"] == "allow" and first["dir"] == str(tmp_path)
    assert first["project"] == "hydralm" and first["notes"] == "first try"  # the user's keys, as given
    assert first["settings"]["api_key"] == "k1"  # wandb gets the key; the logged config does not
    assert first["config"]["logger"]["wandb"]["settings"]["api_key"] == REDACTED
    assert first["config"]["optimizer"]["_target_"] == "torch.optim.AdamW"
    other_run = tmp_path / "other"
    other_run.mkdir()
    assert wandb_init_kwargs(cfg, other_run)["id"] != first["id"]


def test_masking_hides_secret_values_in_free_text_only():
    from launcher.secrets import learn_secrets, mask_secrets

    learn_secrets(["+hub.hf_token=tok-123456", "optimizer.lr=3e-4"])
    text = ("#0 : +logger.wandb.settings.api_key=k-1 optimizer.lr=3e-4 | {'password': 'p w', 'monkey': 'ok'} | "
            "client_secret: s1 | model.tokenizer=/tok | Every key: see docs | the token tok-123456 leaked")
    assert mask_secrets(text) == (
        "#0 : +logger.wandb.settings.api_key=*** optimizer.lr=3e-4 | {'password': ***, 'monkey': 'ok'} | "
        "client_secret: *** | model.tokenizer=/tok | Every key: see docs | the token *** leaked")


@pytest.mark.slow
def test_tags_reach_wandb_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb_records import offline_run

    # In a process of its own: wandb has written everything once that process has exited.
    code = ("import sys; from conftest import compose_config; from launcher.training.loggers import open_loggers\n"
            "cfg = compose_config(['logger=[wandb,tensorboard]', 'tags=[baseline,lr-sweep]', '+logger.wandb.tags=[mine]'])\n"
            "for logger in open_loggers(cfg, __import__('pathlib').Path(sys.argv[1])):\n"
            "    logger.log({'step': 1, 'train_loss': 2.5})\n"
            "    logger.close()\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "WANDB_MODE": "offline"})
    assert list(offline_run(tmp_path)["run"].tags) == ["baseline", "lr-sweep", "mine"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    (tags,) = events.Tensors("tags/text_summary")
    assert tags.tensor_proto.string_val == [b"baseline, lr-sweep"]


def test_without_a_terminal_progress_is_plain_lines_on_stdout_and_in_the_job_log(tmp_path, capsys, monkeypatch):
    """A SLURM log or a pipe gets one line per logged row, no \\r-redrawn bar; hydralm.log (Hydra's
    file handler on the root logger) gets the same lines."""
    import logging

    from launcher.training.metrics import RunLog

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # pytest's captured stderr is not a TTY
    job_log = logging.FileHandler(tmp_path / "hydralm.log")
    logging.getLogger().addHandler(job_log)
    try:
        run_log = RunLog(tmp_path, total_steps=40, enabled=True)
        run_log.advance()
        run_log.write({"step": 10, "epoch": 0, "train_loss": 6.81234, "lr": 3e-4, "grad_norm": 1.5,
                       "tokens_per_s": 5210.4})
        run_log.write({"step": 10, "epoch": 0, "eval_loss": 6.90101, "lr": 3e-4})
        run_log.close()
    finally:
        logging.getLogger().removeHandler(job_log)
        job_log.close()
    expected = ["step 10/40: train loss 6.8123, lr 0.0003, 5210 tokens/s", "step 10/40: eval loss 6.9010"]
    captured = capsys.readouterr()
    assert captured.out.splitlines() == expected
    assert "\r" not in captured.err and "step/s" not in captured.err  # no tqdm bar
    assert (tmp_path / "hydralm.log").read_text().splitlines() == expected


def test_headers_authorization_cookies_and_credentials_are_secret_names():
    """`...http_headers.Authorization` reached .hydra/ and wandb's files (issue 22, case 8)."""
    from launcher.secrets import learn_secrets, mask_secrets

    config = {"logger": {"wandb": {"settings": {"http_headers": {"Authorization": "Bearer abc123"}}}},
              "hub": {"Authorization": "Bearer def456", "cookie": "c=1", "aws_credentials": "AKIA9",
                      "author": "me", "header_rows": 2}}
    clean = scrub(config)
    assert clean["logger"]["wandb"]["settings"]["http_headers"] == REDACTED
    assert clean["hub"] == {"Authorization": REDACTED, "cookie": REDACTED, "aws_credentials": REDACTED,
                            "author": "me", "header_rows": 2}
    learn_secrets(["+logger.wandb.settings.http_headers.Authorization=Bearer zz-98765"])
    text = "+logger.wandb.settings.http_headers.Authorization=Bearer zz-98765 optimizer.lr=3e-4 'auth': 'a-b'"
    assert mask_secrets(text) == "+logger.wandb.settings.http_headers.Authorization=*** optimizer.lr=3e-4 'auth': ***"
