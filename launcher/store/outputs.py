"""Where a job writes: `output_dir`, or Hydra's run/sweep directory of the job.

Hydra's record of the job (`.hydra/`: the config, Hydra's config, the overrides) is written here,
not by Hydra (conf/config.yaml sets `hydra.output_subdir: null`): Hydra writes it before the task
runs, which would overwrite the record of a run whose directory a training run then refuses
(launcher/store/claim.py). No torch at import: the checks before any work use `check_output_dir`.
"""

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError
from launcher.secrets import scrub
from launcher.store.atomic import write_text
from launcher.store.claim import claim

if TYPE_CHECKING:
    from launcher.distributed import World

HYDRA_RECORD = ".hydra"


def resolve_output_dir(cfg: DictConfig, world: "World") -> Path:
    """The directory of a task that does not train (export, evaluate, preprocess). Rank 0 decides
    and hands it to every rank (ranks started a second apart would see different Hydra dirs);
    a training run's directory is refused (`check_not_a_run`), on every rank, before anything
    is written there."""
    from launcher.distributed import on_rank0_then_all  # (checks import this module before torch is needed)

    def choose_on_rank0() -> str:
        path = _local_choice(cfg)
        check_not_a_run(path)
        path.mkdir(parents=True, exist_ok=True)
        record_hydra_job(cfg, path)
        return str(path)

    return Path(on_rank0_then_all(choose_on_rank0, world))


def check_not_a_run(path, key: str = "output_dir") -> None:
    """export, evaluate and preprocess never write into a training run's directory: its
    final-model/, its Hydra record and its files are the run's, and a live run holds its lock
    there. Refused in one line (they write into a directory of their own instead)."""
    from launcher.store.claim import LOCK_FILE, RUN_RECORD

    if path is None:
        return
    path = Path(path)
    found = [name for name in (LOCK_FILE, RUN_RECORD) if os.path.lexists(path / name)]
    if found:
        live = " (a live run holds it)" if LOCK_FILE in found else ""
        raise ConfigError(f"{key}={path} is a training run's directory ({' and '.join(found)} there{live}): "
                          f"task=export/evaluate/preprocess write only into a directory of their own; name "
                          f"another {key} (e.g. {path}/export)")


@contextmanager
def claimed_output_dir(cfg: DictConfig, world: "World") -> Iterator[Path]:
    """A training run's output directory, locked for the run and checked by the directory rule
    (launcher/store/claim.py) before anything is written in it; a refusal is one ConfigError on every rank."""
    from launcher.distributed import on_rank0_then_all

    lock = None

    def claim_on_rank0() -> str:
        nonlocal lock
        path = _local_choice(cfg)
        lock = claim(cfg, path)
        return str(path)

    try:
        path = Path(on_rank0_then_all(claim_on_rank0, world))
        if world.is_main:
            record_hydra_job(cfg, path)
        yield path
    finally:
        if lock is not None:
            lock.release()


def record_hydra_job(cfg: DictConfig, path: Path) -> None:
    """Write Hydra's record of this job (without secrets) and its log into `path`, the job's output
    directory: with an explicit output_dir under -m or SLURM, Hydra's own directory for the job is
    another one (<sweep dir>/<point>)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    keep_job_log_in(path)
    hydra_cfg = HydraConfig.instance().cfg
    record = path / HYDRA_RECORD
    record.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        OmegaConf.save(OmegaConf.create(scrub(OmegaConf.to_container(node, resolve=False))), record / name)


def keep_job_log_in(path: Path) -> None:
    """Hydra's job log (`hydralm.log`, its file handler on the root logger) also written in `path`,
    when Hydra's handler writes elsewhere. Ranks other than 0 have no job log."""
    root = logging.getLogger()
    hydra_logs = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    if not hydra_logs:
        return
    target = (path / Path(hydra_logs[0].baseFilename).name).absolute()
    if any(Path(h.baseFilename) == target for h in hydra_logs):
        return
    handler = logging.FileHandler(target)
    handler.setFormatter(hydra_logs[0].formatter)
    handler.setLevel(hydra_logs[0].level)
    root.addHandler(handler)


def scrub_hydra_outputs() -> None:
    """Rewrite the files Hydra dumped for this job (.hydra/config.yaml, hydra.yaml, overrides.yaml,
    and the sweep's multirun.yaml) without secrets. Call from inside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    files = []
    if hydra_cfg.output_subdir is not None:
        subdir = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
        files += [subdir / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        files.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    for path in files:
        if not path.is_file():
            continue
        dumped = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        clean = scrub(dumped)
        if clean != dumped:
            write_text(path, OmegaConf.to_yaml(OmegaConf.create(clean)))


def _local_choice(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("output_dir must be set when the task is called outside `python -m launcher`")


# A run's files (run.json, run.lock, checkpoints/, .hydra/) belong in a folder of their own: these
# directories themselves are refused (a folder inside them is fine: /var/tmp/run, ~/runs/a).
SYSTEM_DIRECTORIES = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root",
                      "/run", "/sbin", "/srv", "/sys", "/usr", "/var")


def check_not_a_system_directory(target: Path, key: str = "output_dir") -> None:
    resolved = Path(os.path.realpath(target))
    home = Path(os.path.realpath(Path.home()))
    if str(resolved) in SYSTEM_DIRECTORIES or resolved == home:
        what = "your home directory" if resolved == home else "a system directory"
        raise ConfigError(f"{key}={target} is {what}: a run's files need a folder of their own; name a new "
                          f"folder (e.g. {target.as_posix().rstrip('/')}/runs/my-run)")


def check_output_dir(path, key: str = "output_dir") -> None:
    """Before any work: `path` is a directory hydralm can create or write into (tried with a
    directory made and removed at once where it would be created)."""
    if path is None:
        return
    if not str(path).strip():
        raise ConfigError(f"{key}={str(path)!r} is empty: name a directory, or leave {key} unset for "
                          "Hydra's outputs/<date>/<time>/")
    target = Path(path).absolute()
    check_not_a_system_directory(target, key)
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == target else f"is under a file ({existing})"
        raise ConfigError(f"{key}={path} {where}, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hydralm-probe-", dir=existing))
    except OSError as err:
        raise ConfigError(f"{key}={path} cannot be written: {existing} does not accept new directories "
                          f"({err.strerror})") from None
