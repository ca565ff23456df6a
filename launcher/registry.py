"""Named extension points: sharding strategies, data sources.

A config value names an implementation either by its registered name (`sharding.strategy=
full_shard`, `data.source=files`) or by a dotted path to a class of your own
(`data.source=my_pkg.sources.S3Source`), so adding one is one class and one YAML file.
"""

from typing import Callable, Generic, TypeVar

from launcher.errors import ConfigError, choice_error

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, key: str, normalise: Callable[[str], str] = str):
        self.key = key  # the config key that names an entry, for messages
        self.normalise = normalise
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            self._entries[self.normalise(name)] = cls
            cls.name = self.normalise(name)
            return cls

        return add

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> type[T]:
        """The registered class, or the class at a dotted path; one ConfigError otherwise."""
        found = self._entries.get(self.normalise(str(name)))
        if found is not None:
            return found
        if "." not in str(name):
            raise choice_error(self.key, name, [*self.names(), "<module.Class>"])
        return imported_class(self.key, str(name))


def imported_class(key: str, dotted_path: str) -> type:
    """The class a config key names by its dotted path (hydra's get_class); one ConfigError
    naming the key when it cannot be imported. The one importer of user-named classes."""
    from hydra.utils import get_class

    try:
        return get_class(dotted_path)
    except Exception as err:  # noqa: BLE001 (any import failure is the user's path)
        raise ConfigError(f"{key}={dotted_path} cannot be imported: {err}") from None
