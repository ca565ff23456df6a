"""Secrets never leave hydralm in what it writes or prints.

Everything hydralm writes about the config (the run config of the loggers, Hydra's .hydra/
record and dumps) passes through `scrub`: values of keys named like a secret (`api_key`,
`hf_token`, `password`, `client_secret`, ...) are replaced by `***`. `mask_secrets` does the same
to any text (launcher/cli/console.py applies it to everything printed), including the values of
secret overrides that `learn_secrets` saw on the command line wherever they appear.
"""

import re

from omegaconf import DictConfig, OmegaConf

REDACTED = "***"
# A key whose last word is one of these holds a secret (`hf_token`, `http_headers`, `Authorization`).
_SECRET_WORDS = r"api_?key|key|token|password|passwd|secret|authorization|auth|headers?|cookie|credentials?"
_SECRET_NAME = re.compile(rf"(^|[_\-])({_SECRET_WORDS})$", re.IGNORECASE)
_NOT_SECRET = ("full_key",)  # OmegaConf's error messages name the key this way


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name))) and str(name) not in _NOT_SECRET


def scrub(value):
    """A copy of `value` (dicts, lists, `key=value` override strings) with secret values redacted."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_name(k) and v is not None else scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return mask_secrets(value)
    return value


# `name=value`, `name: value`, `'name': 'value'` in free text (console lines, messages, tracebacks).
_ASSIGNMENT_IN_TEXT = re.compile(
    rf"(?P<key>(?<![\w.\-/])[+~]*(?:[\w\-/]+\.)*(?:[\w\-]*[_\-])?(?:{_SECRET_WORDS}))"
    r"(?P<sep>['\"]?\s*[=:]\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|(?:Bearer|Basic|Token)\s+[^\s,;'\"\]\)}]+|[^\s,;'\"\]\)}]+)", re.IGNORECASE)
# A bare `key:` or `token=` is prose ("Every key: see docs"); `hub.key=...`, `api_key: ...` are not.
_PROSE = ("key", "token")
_MIN_SECRET_LENGTH = 4  # shorter values are not worth masking wherever they appear
_secret_values: set[str] = set()


def learn_secrets(overrides) -> None:
    """Remember the values of secret keys given as `key=value` overrides (a sweep's `a,b` too), so
    that `mask_secrets` hides them even where they appear without their key."""
    for override in overrides:
        key, sep, value = str(override).partition("=")
        if sep and is_secret_name(key.rsplit(".", 1)[-1]):
            for part in {value, *value.split(",")}:
                part = part.strip().strip("'\"")
                if len(part) >= _MIN_SECRET_LENGTH:
                    _secret_values.add(part)


def mask_secrets(text: str) -> str:
    """`text` with the value of every secret-named `key=value` / `key: value` and every learnt
    secret value replaced by ***."""

    def masked(match):
        key = match.group("key").lstrip("+~")
        if key.lower() in _PROSE or not is_secret_name(key.rsplit(".", 1)[-1]):
            return match.group(0)
        return match.group("key") + match.group("sep") + REDACTED

    text = _ASSIGNMENT_IN_TEXT.sub(masked, text)
    for value in _secret_values:
        text = text.replace(value, REDACTED)
    return text


def scrubbed_config(cfg: DictConfig) -> dict:
    return scrub(OmegaConf.to_container(cfg, resolve=True))
