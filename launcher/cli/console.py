"""What hydralm says on the console: one-line errors, results also kept in the job log
(`hydralm.log`), and no secret values, whoever prints them (hydralm, Hydra, a traceback).

Hydra reports a composition error (a misspelt key, a missing group option, a value of the wrong
type) in 5 to 15 lines and exits 1; `one_line_errors` makes it one `hydralm: error: ...` line with
the closest valid names, exit 2. Imports only hydra/omegaconf: it runs before every command.
"""

import logging
import os
import re
import sys
import traceback
from contextlib import contextmanager
from typing import NoReturn, Optional

from launcher.errors import AnotherRunsDirectory, closest
from launcher.job_log import record_in_job_log
from launcher.secrets import learn_secrets, mask_secrets

log = logging.getLogger("hydralm")

_FULL_ERROR = "HYDRA_FULL_ERROR"


def refuse(message, what: str = "") -> NoReturn:
    """Print `hydralm: error: <message>` as one line, keep it in the job log (unless the job log is
    another run's), exit 2."""
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if rank not in (None, "0") else ""
    text = " ".join(f"{what}{message}".split())
    line = mask_secrets(f"hydralm: error{where}: {text}")
    print(line, file=sys.stderr, flush=True)
    if not isinstance(message, AnotherRunsDirectory):
        record_in_job_log(logging.ERROR, line)
    sys.exit(2)


# ---------------------------------------------------------------------- secrets on the console


class _MaskedStream:
    """sys.stdout/sys.stderr with the values of secret-looking keys replaced by ***."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(mask_secrets(text) if isinstance(text, str) else text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def masked_console():
    """Everything this process prints, Hydra's echo of the overrides included, without secrets."""
    learn_secrets(sys.argv[1:])
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _MaskedStream(sys.stdout), _MaskedStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


# ---------------------------------------------------------------------- Hydra's errors


@contextmanager
def one_line_errors():
    """Around Hydra's entry point: an error composing the config is one line (exit 2); a job's
    exception is reported as Hydra would (the frames above the task stripped, exit 1), or raw
    when the user set HYDRA_FULL_ERROR. (Hydra prints errors itself unless HYDRA_FULL_ERROR is
    set, so hydralm sets it while Hydra runs.)"""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user_wants_full = os.environ.get(_FULL_ERROR)
    os.environ[_FULL_ERROR] = "1"
    try:
        yield
    except Exception as err:  # noqa: BLE001 (reported below, as Hydra would)
        if isinstance(err, (HydraException, OmegaConfBaseException)) and _job_frame(err) is None:
            refuse(describe_composition_error(err))
        if user_wants_full:
            raise
        _report_job_error(err)
    finally:
        if user_wants_full is None:
            os.environ.pop(_FULL_ERROR, None)
        else:
            os.environ[_FULL_ERROR] = user_wants_full


def _job_frame(err: Exception):
    """The traceback entry of Hydra's run_job, when `err` came from a job (None: from composing)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_name != "run_job":
        tb = tb.tb_next
    return tb


def _report_job_error(err: Exception) -> NoReturn:
    job = _job_frame(err)
    traceback.print_exception(type(err), err, job.tb_next if job is not None else err.__traceback__)
    print(f"\nSet the environment variable {_FULL_ERROR}=1 for a complete stack trace.", file=sys.stderr)
    sys.exit(1)


def describe_composition_error(err: Exception, overrides: Optional[list[str]] = None) -> str:
    """One line for an error Hydra raised while composing the config of `overrides` (default: the
    command line's): what is wrong and the closest valid names."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        if group:
            return (f"{group}={option} is not an option of {group}; choose one of: {', '.join(err.options)}"
                    f"{closest(option, err.options)}")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = err.__cause__
    missing_key = re.match(r"Could not (?:override|delete from config\.) '([^']+)'", lines[0] if lines else "")
    if missing_key:
        overrides = _command_line_overrides() if overrides is None else overrides
        described = _describe_missing_key(missing_key.group(1), overrides, appendable="is not in struct" in str(cause))
        if described:
            return described
    if lines and lines[0].startswith("Error merging override ") and cause is not None:
        return f"{lines[0].removeprefix('Error merging override ')}: {str(cause).splitlines()[0]}"
    details = [line for line in lines if not re.match(r"(full_key|object_type|reference_type|provider)\b", line)]
    if cause is not None and str(cause).strip():
        details.append(str(cause).strip().splitlines()[0])
    return " ".join(details) or repr(err)


def _command_line_overrides() -> list[str]:
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    return list(args.overrides)


# Keys that became others: the message names the new spelling.
RENAMED = {"train.use_mp": "; use train.precision=mixed (train.use_mp=true) or train.precision=fp32 (docs/precision.md)"}


def _describe_missing_key(key: str, overrides: list[str], appendable: bool) -> Optional[str]:
    """`train.epoch is not a key of train; did you mean train.epochs?`, from the config composed
    without the override that named it (None if that config cannot be composed either)."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    rest = [o for o in overrides if re.sub(r"^[+~]*", "", o).split("=", 1)[0] != key]
    try:
        with _config_loader() as loader:
            cfg = loader.load_configuration(config_name="config", overrides=rest, run_mode=RunMode.MULTIRUN)
            group_options = loader.get_group_options(key.split(".")[0]) if "." in key else []
    except Exception:  # noqa: BLE001 (another error: Hydra's message is all we have)
        return None
    node, parent = OmegaConf.to_container(cfg, resolve=False), []
    for segment in key.split("."):
        if not isinstance(node, dict) or segment not in node:
            break
        node = node[segment]
        parent.append(segment)
    else:
        return None
    keys = sorted(node) if isinstance(node, dict) else []
    prefix = "".join(f"{p}." for p in parent)
    suggestion = (RENAMED.get(f"{prefix}{segment}") or closest(segment, keys, prefix)
                  or (f"; its keys: {', '.join(keys)}" if keys else ""))
    message = f"{prefix}{segment} is not a key of {'.'.join(parent) or 'the config'}{suggestion}"
    if len(parent) == 1 and segment in group_options:
        message += f" (select it first: {parent[0]}={segment})"
    elif appendable and len(parent) == key.count("."):
        message += f" (+{key}=... adds it)"
    return message


@contextmanager
def _config_loader():
    """Hydra's config loader: the running one (while a sweep starts), or a new one for hydralm's
    config tree (Hydra clears its own when its entry point fails)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance().config_loader()
        return
    with initialize_config_module(config_module="conf", version_base="1.3"):
        yield GlobalHydra.instance().config_loader()
