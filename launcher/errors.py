"""The one exception type for bad input (the entry point prints it as a single line), and the
small checks that raise it."""

import collections.abc
import difflib
import enum
import inspect
import math
import types
import typing

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A config value, path or combination that cannot work. The message names the key."""


class AnotherRunsDirectory(ConfigError):
    """output_dir holds another run, or one in use: refused without writing anything there, the
    job log included (launcher/store/claim.py)."""


class RunStopped(Exception):
    """A run stops early on purpose (a signal, a non-finite loss): the entry point prints the
    message as one line and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # crosses ranks (launcher.distributed.on_rank0_then_all) with its exit code
        return RunStopped, (str(self), self.exit_code)


def closest(name: str, valid, prefix: str = "") -> str:
    """`; did you mean x?` naming the valid names closest to a misspelt `name` (difflib), or ''."""
    matches = difflib.get_close_matches(str(name), [str(v) for v in valid], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(prefix + m for m in matches)}?" if matches else ""


def choice_error(key: str, value: object, choices) -> ConfigError:
    listed = ", ".join(str(c) for c in choices)
    return ConfigError(f"{key}={value!r} is not valid; choose one of: {listed}{closest(value, choices)}")


def at_least(value, minimum, key: str) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def check_arguments(key: str, options, function, name: str, reserved=(), noun: str = "argument") -> None:
    """Every key of `options` is a keyword argument of `function` (called `name` in messages);
    `reserved` arguments are set by hydralm, not by the config. When `options` is a mapping, each
    value must also fit the parameter's annotation (`lr: float` refuses 'abc'), so a wrong type
    is one line before any work instead of a TypeError from deep inside `function`."""
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    valid = [p for p, spec in parameters.items() if p not in reserved and spec.kind not in (spec.VAR_POSITIONAL,
                                                                                             spec.VAR_KEYWORD)]
    unknown = [k for k in options if k not in valid and (k in reserved or not takes_any)]
    if unknown:
        article = "an" if noun[0] in "aeiou" else "a"
        raise ConfigError(f"{key}.{unknown[0]} is not {article} {noun} of {name}"
                          + (" (hydralm sets it)" if unknown[0] in reserved else "")
                          + f"; valid {noun}s: {', '.join(valid) or 'none'}{closest(unknown[0], valid)}")
    if not isinstance(options, collections.abc.Mapping):
        return
    for option, value in options.items():
        if option not in parameters:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        annotation = _evaluated(parameters[option].annotation, function)
        if not fits(value, annotation):
            raise ConfigError(f"{key}.{option}={value!r} does not match {name}'s "
                              f"{option}: {inspect.formatannotation(annotation)}")


def _evaluated(annotation, function):
    """A string annotation (`from __future__ import annotations`) evaluated where `function` was
    defined; one that cannot be (a name imported only for type checkers) counts as unknown."""
    if not isinstance(annotation, str):
        return annotation
    code = inspect.unwrap(function.__init__ if isinstance(function, type) else function)
    try:
        return eval(annotation, getattr(code, "__globals__", {}))  # noqa: S307 (the library's own annotation)
    except Exception:  # noqa: BLE001
        return inspect.Parameter.empty


def fits(value, annotation) -> bool:
    """Whether a config value (None, bool, int, float, str, list, dict) can be passed where
    `annotation` is declared. Annotations it cannot judge (Any, callables, type variables)
    accept anything; so does a class other than the basic types for a list or dict (the callee
    may build it from one)."""
    if annotation in (inspect.Parameter.empty, typing.Any) or isinstance(annotation, (typing.TypeVar, str)):
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, member) for member in args)
    if origin is typing.Literal:
        return value in args
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    container = origin or annotation
    if not isinstance(container, type) or container is collections.abc.Callable:
        return True
    if issubclass(container, (str, bytes)):
        return isinstance(value, container)
    if issubclass(container, collections.abc.Mapping):
        return isinstance(value, dict)
    if issubclass(container, (collections.abc.Sequence, collections.abc.Iterable)) and container is not object:
        if not isinstance(value, (list, tuple)):
            return isinstance(value, container)
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return not args or all(fits(v, args[0]) for v in value)
    if issubclass(container, enum.Enum):
        return isinstance(value, (str, container)) or value in {m.value for m in container}
    return isinstance(value, (container, list, dict))


def finite(value) -> bool:
    """No NaN or infinity anywhere in a config value (a number or a list of them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True
