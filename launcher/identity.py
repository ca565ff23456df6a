"""What identifies a result: the one place that decides which settings a cached dataset or a
training run depends on.

The answer is read off the schema (launcher/schema.py): every field says, or inherits from its
group, what it `affects`. So a key added to the schema is part of every identity its group is
part of, without anyone remembering to list it; only a deliberate `affects(...)` takes it out.
"""

import dataclasses
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launcher.schema import Config


def identity(cfg: DictConfig, purpose: str) -> dict[str, Any]:
    """{dotted key: resolved value} of every setting of `cfg` that affects `purpose`
    (launcher.schema.PREPROCESSING or RUN)."""
    found: dict[str, Any] = {}
    _collect(Config, cfg, "", frozenset(), purpose, found)
    return found


def first_difference(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ, sorted (missing keys count as differing)."""
    return sorted(k for k in saved.keys() | current.keys() if saved.get(k, _ABSENT) != current.get(k, _ABSENT))


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
    return value
