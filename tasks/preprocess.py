"""The `preprocess` task: tokenize + pack the corpus and save {train,eval} datasets to disk.

Its output is what `data=preprocessed data.train_ds=... data.eval_ds=...` trains on.
"""

from pathlib import Path

from omegaconf import DictConfig

from launcher.corpus import split_pydoc
from launcher.data import build_splits, preprocess_settings, save_splits
from launcher.distributed import World
from launcher.errors import ConfigError
from launcher.modeling import load_tokenizer
from launcher.outputs import resolve_output_dir
from launcher.validate import model_config

SINGLE_PROCESS = World(rank=0, local_rank=0, size=1, local_size=1, device=None)


def preprocess(cfg: DictConfig) -> dict:
    if cfg.data.source == "preprocessed":
        raise ConfigError("task=preprocess needs a raw corpus; data.source=preprocessed is already preprocessed")
    save_path = Path(cfg.data.save_path or resolve_output_dir(cfg, SINGLE_PROCESS) / "data")
    tokenizer = load_tokenizer(model_config(cfg))
    texts = split_pydoc(cfg.data.eval_every)
    splits = build_splits(cfg, tokenizer, texts)
    save_splits(splits, save_path, preprocess_settings(cfg, tokenizer, texts))
    print(
        f"hydralm: {len(splits['train'])} train / {len(splits['eval'])} eval sequences -> {save_path}\n"
        f"  train on it with: data=preprocessed data.train_ds={save_path / 'train'} data.eval_ds={save_path / 'eval'}"
    )
    return {"save_path": str(save_path), **{f"{name}_sequences": len(ds) for name, ds in splits.items()}}
