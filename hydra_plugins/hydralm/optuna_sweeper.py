"""`hydra/sweeper=hydralm_optuna`: hydra-optuna-sweeper with its study kept in the sweep directory.

conf/hydra/sweeper/hydralm_optuna.yaml extends the plugin's config (`hydra/sweeper=optuna`) with
this class, a SQLite study at `<hydra.sweep.dir>/optuna.db` and a fixed study name, so running
the same command again (same `hydra.sweep.dir`) continues the study. What this adds to the plugin:

- trial N runs as Hydra job N, so a continued study's trials get new run directories instead of
  starting again at job 0 (the plugin always does), and the report can pair trials with runs;
- the study remembers the search it was created for (search space, fixed overrides, direction):
  a different command on the same sweep directory stops with one line instead of mixing its
  trials into another search's study;
- a new study refuses a sweep directory that already holds runs.

Each job returns the float the study optimises: `objective` (launcher/training/objective.py). Imports no
torch; optuna only when a sweep starts.
"""

import logging
import sys
from pathlib import Path
from typing import Any, List, Optional

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from launcher.errors import ConfigError

SEARCH_ATTR = "hydralm_search"  # study user attribute: what the study searches

# optuna's SQLite storage imports alembic, which logs a line per migration plugin at INFO; Hydra
# imports optuna while it builds the sampler, before this sweeper exists.
logging.getLogger("alembic").setLevel(logging.WARNING)


class OptunaSearch(OptunaSweeper):
    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def sweep(self, arguments: List[str]) -> None:
        try:
            self._prepare_study(arguments)
        except ConfigError as err:
            print(f"hydralm: error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        return super().sweep(arguments)

    def _prepare_study(self, arguments: List[str]) -> None:
        import optuna

        impl = self.sweeper
        search = {
            "overrides": [f"{k}={v}" for k, v in (impl.params or {}).items()] + list(arguments),
            "directions": impl._get_directions(),
        }
        study = _stored_study(impl.storage, impl.study_name)
        if study is None:
            _refuse_existing_runs(self.sweep_dir)
            if impl.storage is not None and impl.study_name is not None:
                self.sweep_dir.mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its folder
                study = optuna.create_study(storage=impl.storage, study_name=impl.study_name,
                                            directions=search["directions"])
                study.set_user_attr(SEARCH_ATTR, search)
            return
        _check_same_search(study, search, self.sweep_dir)
        impl.job_idx = len(study.trials)  # trial N is job N: new trials never reuse a run directory
        if hasattr(impl.sampler, "reseed_rng"):
            impl.sampler.reseed_rng()  # a seeded sampler would repeat the first run's startup samples


def _stored_study(storage: Optional[Any], name: Optional[str]):
    """The study `name` in `storage`, or None (no storage, no name, or not created yet)."""
    import optuna

    if storage is None or name is None:
        return None
    if str(storage).startswith("sqlite:///") and not Path(str(storage)[len("sqlite:///"):]).is_file():
        return None  # do not create an empty database just to look
    if name not in {summary.study_name for summary in optuna.get_all_study_summaries(storage)}:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def _refuse_existing_runs(sweep_dir: Path) -> None:
    runs = sorted(p.parent.name for p in sweep_dir.glob("*/.hydra")) if sweep_dir.is_dir() else []
    if runs:
        raise ConfigError(f"hydra.sweep.dir={sweep_dir} already holds runs ({', '.join(runs[:5])}"
                          f"{', ...' if len(runs) > 5 else ''}) that are not trials of an Optuna study there; "
                          "give a new hydra.sweep.dir")


def _check_same_search(study, search: dict, sweep_dir: Path) -> None:
    stored = study.user_attrs.get(SEARCH_ATTR)
    if stored is None:
        return
    before = {"hydra.sweeper.direction": ",".join(stored["directions"]), **_by_key(stored["overrides"])}
    now = {"hydra.sweeper.direction": ",".join(search["directions"]), **_by_key(search["overrides"])}
    if before == now:
        return
    key = min(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    raise ConfigError(f"hydra.sweep.dir={sweep_dir} holds the Optuna study of another search ({key}: "
                      f"{before.get(key, 'not set')} in the study, {now.get(key, 'not set')} now); run the study's "
                      "own command to continue it, or give a new hydra.sweep.dir")


def _by_key(overrides: List[str]) -> dict:
    """`key=value` overrides as {key: value}; the last one wins, as in Hydra."""
    return dict(override.split("=", 1) if "=" in override else (override, "") for override in overrides)
