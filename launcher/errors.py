"""The one exception type for bad input: the entry point prints it as a single line."""


class ConfigError(ValueError):
    """A config value, path or combination that cannot work. The message names the key."""


def choice_error(key: str, value: object, choices) -> ConfigError:
    listed = ", ".join(str(c) for c in choices)
    return ConfigError(f"{key}={value!r} is not valid; choose one of: {listed}")
