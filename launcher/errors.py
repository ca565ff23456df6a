"""The one exception type for bad input (the entry point prints it as a single line), and the
small checks that raise it."""

import inspect


class ConfigError(ValueError):
    """A config value, path or combination that cannot work. The message names the key."""


class RunStopped(Exception):
    """A run stops early on purpose (a signal, a non-finite loss): the entry point prints the
    message as one line and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # crosses ranks (launcher.distributed.on_rank0_then_all) with its exit code
        return RunStopped, (str(self), self.exit_code)


def choice_error(key: str, value: object, choices) -> ConfigError:
    listed = ", ".join(str(c) for c in choices)
    return ConfigError(f"{key}={value!r} is not valid; choose one of: {listed}")


def at_least(value, minimum, key: str) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def check_arguments(key: str, options, function, name: str, reserved=(), noun: str = "argument") -> None:
    """Every key of `options` is a keyword argument of `function` (called `name` in messages);
    `reserved` arguments are set by hydralm, not by the config."""
    valid = [p for p in inspect.signature(function).parameters if p not in reserved]
    unknown = [k for k in options if k not in valid]
    if unknown:
        article = "an" if noun[0] in "aeiou" else "a"
        raise ConfigError(f"{key}.{unknown[0]} is not {article} {noun} of {name}"
                          + (" (hydralm sets it)" if unknown[0] in reserved else "")
                          + f"; valid {noun}s: {', '.join(valid)}")
