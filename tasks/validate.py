"""The `validate` task: check a config without running it.

On the command line ChecksBeforeWork (launcher/cli/validate.py) answers before Hydra makes any
directory, one line per sweep point; this function is what a direct call (`run_task`) reaches
once the checks have passed.
"""

from omegaconf import DictConfig


def validate(cfg: DictConfig) -> dict:
    print("hydralm: ok", flush=True)
    return {"ok": True}
