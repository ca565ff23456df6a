"""The key reference (docs/config.md, "Every key") documents each key of the schema exactly once.

The schema is read when the test runs, so a key another change adds fails here until its row is
written. Milliseconds: no torch, no Hydra composition.
"""

import dataclasses
import re
import typing

from conftest import ROOT

from launcher.schema import Config

REFERENCE = ROOT / "docs" / "config.md"


def schema_keys(cls, prefix=""):
    """Every key of the schema: the fields of its dataclasses, nested ones by their dotted path
    (a free-form mapping such as `optimizer` or `model.config` is one key)."""
    keys = []
    for field in dataclasses.fields(cls):
        node = next((t for t in typing.get_args(field.type) if t is not type(None)), field.type)
        if dataclasses.is_dataclass(node):
            keys += schema_keys(node, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def documented_keys():
    """The first cell of each row of the "Every key" table, in order (duplicates kept)."""
    section = REFERENCE.read_text().split("\n## Every key\n", 1)[1]
    table = section.split("\n#", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE)


def test_every_schema_key_has_exactly_one_entry_in_the_key_reference():
    documented = documented_keys()
    keys = schema_keys(Config)
    assert len(keys) > 90  # the walk reached the nested groups
    assert sorted(set(keys) - set(documented)) == [], "schema keys without a row in docs/config.md"
    assert sorted({k for k in documented if documented.count(k) > 1}) == [], "keys documented twice"
    assert sorted(set(documented) - set(keys)) == [], "rows for keys the schema does not have"


def test_the_key_walk_reads_nested_and_optional_groups():
    """Hand-written: what the walk must give for a small schema (an optional nested group, a mapping)."""

    @dataclasses.dataclass
    class Inner:
        a: int = 1
        b: typing.Optional[str] = None

    @dataclasses.dataclass
    class Outer:
        inner: typing.Optional[Inner] = None
        mapping: typing.Dict[str, typing.Any] = dataclasses.field(default_factory=dict)
        top: bool = False

    assert schema_keys(Outer) == ["inner.a", "inner.b", "mapping", "top"]
