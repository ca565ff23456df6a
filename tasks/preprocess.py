"""The `preprocess` task: tokenize + pack a corpus and save {train,eval} datasets to disk.

Its output is what `data=preprocessed data.train_ds=... data.eval_ds=...` trains on. Re-running
with the same corpus, tokenizer and settings finds the result up to date and does nothing.
"""

import json
from pathlib import Path

from omegaconf import DictConfig

from launcher.console import announce
from launcher.data import build_and_save, is_up_to_date, packing_spec, preprocess_settings
from launcher.distributed import World
from launcher.errors import ConfigError
from launcher.modeling import load_tokenizer
from launcher.outputs import resolve_output_dir
from launcher.sources import source_of
from launcher.task_model import model_config

SINGLE_PROCESS = World(rank=0, local_rank=0, size=1, local_size=1, device=None)


def preprocess(cfg: DictConfig) -> dict:
    source = source_of(cfg.data)
    if source.tokenized:
        raise ConfigError(f"task=preprocess needs a raw corpus; data.source={cfg.data.source} is already preprocessed")
    tokenizer = load_tokenizer(model_config(cfg))
    packing_spec(cfg, tokenizer)  # tokenizer-dependent checks before any loading
    raw = source.splits()
    save_path = Path(cfg.data.save_path or resolve_output_dir(cfg, SINGLE_PROCESS) / "data")
    settings = preprocess_settings(cfg, tokenizer, source, raw, "rows")
    if is_up_to_date(save_path, settings):
        report = json.loads((save_path / "report.json").read_text())
        announce(f"hydralm: {save_path} is up to date (same corpus, tokenizer and settings); nothing to do")
        return {"save_path": str(save_path), "cached": True, **report}
    report = build_and_save(cfg, tokenizer, raw, save_path, settings)
    announce(
        f"hydralm: {report['train_rows']} train / {report['eval_rows']} eval sequences -> {save_path}\n"
        f"  train on it with: data=preprocessed data.train_ds={save_path / 'train'} data.eval_ds={save_path / 'eval'}"
    )
    return {"save_path": str(save_path), "cached": False, **report}
