"""What identifies a result: the one place that decides which settings a cached dataset or a
training run depends on.

The answer is read off the schema (launcher/schema.py): every field says, or inherits from its
group, what it `affects`. So a key added to the schema is part of every identity its group is
part of, without anyone remembering to list it; only a deliberate `affects(...)` takes it out.

An identity holds no install path: an asset shipped with hydralm (`${hydralm.asset:tiny_bpe}`,
launcher/assets/) is identified by its name and the hash of its content, so the same commit from
another clone or virtualenv is the same run and hits the same cache entries.
"""

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from launcher import schema
from launcher.schema import BATCH_LAYOUT, LENGTH, RUN, Config


def identity(cfg: DictConfig, purpose: str) -> dict[str, Any]:
    """{dotted key: resolved value} of every setting of `cfg` that affects `purpose`
    (launcher.schema.PREPROCESSING, RUN or BATCH_LAYOUT)."""
    found: dict[str, Any] = {}
    _collect(Config, cfg, "", frozenset(), purpose, found)
    return found


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What identifies a training run, one flat key per leaf (`optimizer.lr`, `model.config.hidden_size`),
    in schema order, as JSON would give it back (run.json and checkpoints store it)."""
    return json.loads(json.dumps(flatten(identity(cfg, RUN))))


# A checkpoint's fingerprint is the run identity plus what only a loaded run knows: these keys.
TOKENIZER, TRAIN_SEQUENCES = "tokenizer", "data.train_sequences"


def layout_keys(cfg: DictConfig) -> set[str]:
    """The run keys an explicit `resume=<checkpoint>` may change (how the global batch is split)."""
    return set(identity(cfg, BATCH_LAYOUT))


def length_keys(cfg: DictConfig) -> dict[str, Any]:
    """{key: value} of the run keys that only say how long it goes on (train.epochs,
    train.max_steps): a run continues under new values of them."""
    return flatten(identity(cfg, LENGTH))


def differing_keys(saved: dict, current: dict, ignore: Iterable[str] = ()) -> list[str]:
    """The keys whose values differ, in `current`'s order, then keys only `saved` has."""
    ignored = set(ignore)
    keys = [k for k in current if k not in ignored] + [k for k in saved if k not in current and k not in ignored]
    return [k for k in keys if saved.get(k, _ABSENT) != current.get(k, _ABSENT)]


def flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


_ABSENT = object()


def _collect(schema: type, node: DictConfig, prefix: str, inherited: frozenset, purpose: str, found: dict) -> None:
    for field in dataclasses.fields(schema):
        purposes = field.metadata.get("affects", inherited)
        key = f"{prefix}{field.name}"
        value = OmegaConf.select(node, field.name, throw_on_missing=False) if node is not None else None
        nested = _dataclass_of(field.type)
        if nested is not None:
            # An unset optional group (cluster, dpo) adds nothing: adding one changes no identity.
            if value is not None:
                _collect(nested, value, key + ".", purposes, purpose, found)
        elif purpose in purposes:
            found[key] = _plain(value)


def _dataclass_of(annotation) -> type | None:
    """The dataclass of a field typed `X` or `Optional[X]`, else None."""
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def _plain(value):
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        return _asset_content(value) or value
    return value


def _asset_content(value: str) -> str | None:
    """`hydralm-asset:<name> sha256:<hash of its files>` for a path inside hydralm's assets, else None."""
    assets = Path(schema.ASSETS_DIR).resolve()
    try:
        path = Path(value).resolve()
        name = path.relative_to(assets)
    except (ValueError, OSError):
        return None
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        if "__pycache__" in file.parts:
            continue
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return f"hydralm-asset:{name.as_posix()} sha256:{digest.hexdigest()}"
