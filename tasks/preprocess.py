"""The `preprocess` task: tokenize + pack a corpus and save {train,eval} datasets to disk.

Its output is what `data=preprocessed data.train_ds=... data.eval_ds=...` trains on. Re-running
with the same corpus, tokenizer and settings finds the result up to date (and intact: every file
matches its checksum) and does nothing; two runs at once build it once.
"""

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launcher.data.mixture import describe_mixture
from launcher.data.preprocessing import (check_tokenizer, ensure_built, mix_components, one_builder, prepared_splits,
                                         preprocess_settings)
from launcher.data.sources import source_of
from launcher.distributed import ONE_PROCESS
from launcher.errors import ConfigError
from launcher.job_log import announce
from launcher.model.modeling import load_tokenizer
from launcher.model.task_model import model_config
from launcher.store.atomic import atomic_directory, check_replaceable, owned
from launcher.store.integrity import CHECKSUMS, file_checksums
from launcher.store.outputs import check_not_a_run, resolve_output_dir


def check_save_path(cfg: DictConfig) -> None:
    """Before any work: `data.save_path` is new, empty, or an earlier output of task=preprocess
    (its COMPLETE marker and checksums); hydralm replaces nothing else there."""
    if not cfg.data.save_path:
        check_not_a_run(cfg.output_dir)  # <output_dir>/data: never inside a training run's directory
        return
    path = Path(cfg.data.save_path)
    check_replaceable(path, "data.save_path")
    if owned(path) and not (path / CHECKSUMS).is_file():
        raise ConfigError(f"data.save_path={path} holds another hydralm result (a checkpoint or model), not an "
                          f"output of task=preprocess: name a new or empty directory")


def preprocess(cfg: DictConfig) -> dict:
    source = source_of(cfg.data)
    if source.tokenized:
        raise ConfigError(f"task=preprocess needs a raw corpus; data.source={cfg.data.source} is already preprocessed")
    tokenizer = load_tokenizer(model_config(cfg))
    save_path = Path(cfg.data.save_path or resolve_output_dir(cfg, ONE_PROCESS) / "data")
    check_save_path(OmegaConf.merge(cfg, {"data": {"save_path": str(save_path)}}))
    if source.mixes:
        return _save_mixture(cfg, tokenizer, save_path)
    check_tokenizer(cfg, tokenizer)  # tokenizer-dependent checks before any loading
    raw = source.splits()
    settings = preprocess_settings(cfg, tokenizer, source, raw, "rows")
    report, built = ensure_built(cfg, tokenizer, raw, save_path, settings)
    if not built:
        announce(f"hydralm: {save_path} is up to date (same corpus, tokenizer and settings); nothing to do")
        return {"save_path": str(save_path), "cached": True, **report}
    _print_saved(report, save_path)
    return {"save_path": str(save_path), "cached": False, **report}


def _save_mixture(cfg: DictConfig, tokenizer, save_path: Path) -> dict:
    """The mixed rows, written out as plain datasets (the components are cached on their own)."""
    splits, report = mix_components(cfg, tokenizer, ONE_PROCESS, prepared_splits)
    with one_builder(save_path):
        with atomic_directory(save_path) as staging:
            for name, dataset in splits.items():
                dataset.flatten_indices().save_to_disk(str(staging / name))
            (staging / "report.json").write_text(json.dumps(report, indent=2))
            (staging / CHECKSUMS).write_text(json.dumps(file_checksums(staging), indent=1))
    announce(f"hydralm: mixture:\n{describe_mixture(report)}")
    _print_saved(report, save_path)
    return {"save_path": str(save_path), "cached": False, **report}


def _print_saved(report: dict, save_path: Path) -> None:
    announce(
        f"hydralm: {report['train_rows']} train / {report['eval_rows']} eval sequences -> {save_path}\n"
        f"  train on it with: data=preprocessed data.train_ds={save_path / 'train'} data.eval_ds={save_path / 'eval'}"
    )
