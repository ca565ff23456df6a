"""The `evaluate` task: eval loss and perplexity of `checkpoint` (an exported model or a
training checkpoint) or `model`, on the eval split of `data`.

A checkpoint of a hydralm run (`<run>/final-model`, `<run>/checkpoints/checkpoint-N`) is scored
on that run's own data and settings: its `data` and `train` keys come from the run's
`.hydra/config.yaml`, except those named on the command line (`data=...`, `data.eval_bs=8`,
`train.max_eval_batches=4`). So the loss equals the run's own final eval loss on the same model.
`eval.json` (the checkpoint, the data, the split, the token count, the loss) goes to `output_dir`
when given, else into the run's directory (beside the checkpoint when it is no run's). Nothing
else of the run's is touched, a live run's directory not at all (launcher/store/atomic.py's
ownership rule: an `eval.json` hydralm did not write is never replaced).
"""

import math
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from launcher.store.run_dir import CHECKPOINTS_DIR

RUN_SETTINGS = ("data", "train")  # what the run's data and its eval split are made of
HYDRA_RECORD = Path(".hydra") / "config.yaml"
RESULT = "eval.json"


def evaluate(cfg: DictConfig) -> dict:
    from launcher.job_log import announce
    from launcher.data.loaders import eval_loader
    from launcher.distributed import distributed, seed_everything
    from launcher.model.task_model import load_task_model
    from launcher.store.atomic import WRITTEN_BY, write_json
    from launcher.store.outputs import resolve_output_dir
    from launcher.secrets import scrub
    from launcher.training.trainer import evaluate as evaluate_loss
    from tasks.train import LanguageModeling

    run = checkpoint_run(cfg.checkpoint)
    cfg = with_run_settings(cfg, run)
    with distributed(cfg.sharding.backend, cfg.sharding.collective_timeout_s) as world:
        seed_everything(cfg.train.seed)
        # The run's directory keeps its own Hydra record: only an explicit output_dir gets this job's.
        output_dir = resolve_output_dir(cfg, world) if cfg.output_dir else result_dir(cfg.checkpoint, run)
        model_cfg, tokenizer, model = load_task_model(cfg, world)
        task = LanguageModeling(cfg)
        split = task.datasets(tokenizer, world)["eval"]
        loader = eval_loader(split, cfg, world, task.collator(tokenizer))
        loss = evaluate_loss(model, loader, task, world, cfg.train.max_eval_batches)["eval_loss"]
        batches = len(loader) if cfg.train.max_eval_batches is None else min(len(loader), cfg.train.max_eval_batches)
        result = {
            "model": model_cfg.path or model_cfg.name,
            "checkpoint": str(Path(cfg.checkpoint).absolute()) if cfg.checkpoint else None,
            "settings_from": str(run / HYDRA_RECORD) if run else "the command line",
            "data": scrub(OmegaConf.to_container(cfg.data, resolve=True)),  # no tokens in a result file
            "split": "eval",
            "eval_sequences": len(split),
            "eval_batches": batches,
            "eval_tokens": _scored_tokens(loader, batches, task, world),
            "eval_loss": loss,
            "perplexity": math.exp(loss),
        }
        if world.is_main:
            write_json(output_dir / RESULT, {**WRITTEN_BY, **result})
            announce(f"hydralm: eval loss {loss:.4f} (perplexity {result['perplexity']:.2f}) on "
                     f"{result['eval_tokens']} tokens of the eval split of data={cfg.data.source} "
                     f"({result['settings_from']}) -> {output_dir / RESULT}")
        return result


def check_evaluate(cfg: DictConfig) -> None:
    """Before any work: the run's settings with the command line's on top pass the data checks,
    and eval.json may be written where it goes."""
    from launcher.data.preprocessing import check_data

    run = checkpoint_run(cfg.checkpoint)
    check_data(with_run_settings(cfg, run))
    if cfg.output_dir:
        check_result_file(Path(cfg.output_dir), "output_dir")
    elif cfg.checkpoint:
        check_result_file(result_dir(cfg.checkpoint, run), "checkpoint")


def check_result_file(directory: Path, key: str) -> None:
    """An `eval.json` there is replaced only when hydralm wrote it (a symlink, a directory or a
    FIFO in its place is one line too), and a live run's directory is not written at all."""
    from launcher.errors import ConfigError
    from launcher.store.atomic import WRITTEN_BY, read_own_json
    from launcher.store.claim import LOCK_FILE

    if (directory / LOCK_FILE).exists() or (directory / LOCK_FILE).is_symlink():
        raise ConfigError(f"{key}: {directory} belongs to a run that is training now ({LOCK_FILE} there): give "
                          f"output_dir=<a directory of its own> for eval.json")
    path = directory / RESULT
    record = read_own_json(path)
    if path.exists() and not (isinstance(record, dict) and record.get("written_by") == WRITTEN_BY["written_by"]):
        where = f"output_dir={directory}" if key == "output_dir" else str(directory)
        raise ConfigError(f"{where} holds an {RESULT} hydralm did not write: hydralm replaces only what it "
                          f"wrote; name another output_dir (or move that file away)")


def checkpoint_run(checkpoint: Optional[str]) -> Optional[Path]:
    """The hydralm run directory `checkpoint` belongs to (`<run>/final-model`,
    `<run>/checkpoints/checkpoint-N`), or None."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).absolute()
    candidates = [path.parent] + ([path.parent.parent] if path.parent.name == CHECKPOINTS_DIR else [])
    return next((run for run in candidates if (run / HYDRA_RECORD).is_file()), None)


def with_run_settings(cfg: DictConfig, run: Optional[Path]) -> DictConfig:
    """`cfg` with the run's `data` and `train` keys, except those named on the command line."""
    from launcher.data.preprocessing import normalise_data

    if run is None:
        return cfg
    told = _command_line_keys()
    run_cfg = OmegaConf.load(run / HYDRA_RECORD)
    merged = cfg.copy()
    with read_write(merged), open_dict(merged):
        for group in RUN_SETTINGS:
            if group in told or group not in run_cfg:
                continue  # `data=files`: the user chose another data group
            merged[group] = OmegaConf.merge(cfg[group], run_cfg[group])
            for key in told:
                if key.startswith(group + "."):
                    OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
        normalise_data(merged.data)  # the merged keys, normalised as check_config normalises the command line's
    return merged


def result_dir(checkpoint: str, run: Optional[Path]) -> Path:
    return run if run is not None else Path(checkpoint).absolute().parent


def _command_line_keys() -> set[str]:
    """The keys (and groups) of this job's command-line overrides."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {override.split("=", 1)[0].lstrip("+~") for override in HydraConfig.get().overrides.task}


def _scored_tokens(loader, batches: int, task, world) -> int:
    """The tokens the loss is averaged over (labelled, not padding), all ranks."""
    import torch
    import torch.distributed as dist

    total = torch.zeros((), dtype=torch.int64)
    for _, batch in zip(range(batches), loader):
        total += task.weight(batch).to(torch.int64).sum()
    if world.size > 1:
        total = total.to(world.device)
        dist.all_reduce(total)
    return int(total)
