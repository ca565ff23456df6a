"""Logger plumbing that needs no training run: secret scrubbing and the persistent wandb run id."""

from conftest import compose_config
from launcher.loggers import REDACTED, scrub, wandb_init_kwargs


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
