"""Plots and a comparison table from the metrics.jsonl of one run, or of every run of a sweep.

    python -m launcher.cli.report multirun/2026-11-28/01-04-45 [--out DIR]
    python -m launcher task=report report.dir=multirun/2026-11-28/01-04-45

Writes, to `<dir>/report` unless told otherwise:
- loss.png (train and eval loss vs tokens seen), lr.png, grad_norm.png and tokens_per_s.png (vs
  optimizer step): one colour per run, all distinct, the legend beside the plot, the best run
  drawn thick and starred. lr.png draws the lr of every step as the run's schedule gives it
  (hydralm's own scheduler, rebuilt from the run's .hydra/config.yaml), the logged values as
  dots (an eval-driven schedule: the logged values only);
- objective.png: the objective (`objective`, default eval_loss) against each swept key, one
  panel per key, the best run starred; a key searched on a log scale (Optuna `log=True`, the
  sweeper's `tag(log, ...)`) on a log axis;
- optuna_history.png when the directory holds an Optuna study (optuna.db, hydra/sweeper=
  hydralm_optuna): the objective of each trial and the best so far; with two or more searched
  parameters also optuna_importance.png (optuna.importance's parameter importances) and
  optuna_contour.png (the objective over the two most important parameters, log10 of a
  log-scale one);
- report.md: one row per run with the swept overrides (from each run's .hydra/overrides.yaml) as
  columns, the final objective, throughput and wall time, the best run marked; and for a study,
  its trials, best parameters and history.
Needs no model; torch only to rebuild a schedule for lr.png.
"""

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from launcher.errors import ConfigError
from launcher.job_log import announce

BEST_MARK = "★ best"
STUDY_FILE = "optuna.db"
MINIMIZE, MAXIMIZE = "minimize", "maximize"


@dataclass
class Run:
    name: str  # the run directory relative to the report's directory ("." for a single run)
    rows: list[dict]
    overrides: dict[str, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    objective: str = "eval_loss"  # the run's `objective` key
    job_num: Optional[int] = None  # Hydra's job number in its sweep (= the Optuna trial number)
    direction: Optional[str] = None  # hydra.sweeper.direction of its sweep, if it had one
    config: dict = field(default_factory=dict)  # its .hydra/config.yaml
    search_space: dict = field(default_factory=dict)  # hydra.sweeper.params of its sweep

    def last(self, key: str) -> Optional[float]:
        return next((row[key] for row in reversed(self.rows) if key in row), None)

    @property
    def objective_value(self) -> Optional[float]:
        final_eval = self.summary.get("final_eval") or {}
        return final_eval.get(self.objective, self.last(self.objective))

    @property
    def wall_time_s(self) -> Optional[float]:
        return self.summary.get("train_wall_time_s", self.last("time_s"))

    @property
    def tokens_per_s(self) -> Optional[float]:
        if "tokens_per_s" in self.summary:
            return self.summary["tokens_per_s"]
        tokens, seconds = self.last("tokens_seen"), self.last("time_s")
        return tokens / seconds if tokens and seconds else None


@dataclass
class Trial:
    number: int
    state: str  # COMPLETE, FAIL, RUNNING, ...
    value: Optional[float]
    params: dict


@dataclass
class Study:
    name: str
    direction: str
    trials: list[Trial]
    optuna_study: object = None  # the optuna.Study, for optuna's own plots
    importances: Optional[dict] = None  # parameter -> fANOVA importance, once _optuna_plots ran

    @property
    def best(self) -> Optional[Trial]:
        complete = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        return _best(complete, lambda t: t.value, self.direction)


# ---------------------------------------------------------------------- reading


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(directory: Path) -> list[Path]:
    """`directory` itself when it is a run, else every run below it (a sweep), in natural order."""
    if (directory / "metrics.jsonl").is_file():
        return [directory]
    return sorted((p.parent for p in directory.rglob("metrics.jsonl")), key=_natural_key)


def _read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def load_run(run_dir: Path, root: Path) -> Run:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed job
            continue
    overrides = {}
    for override in _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []:
        key, _, value = override.partition("=")
        if key.lstrip("+~") != "output_dir":
            overrides[key.lstrip("+~")] = value
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    config = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    hydra = (_read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra", {})
    direction = (hydra.get("sweeper") or {}).get("direction")
    job_num = (hydra.get("job") or {}).get("num")
    search_space = (hydra.get("sweeper") or {}).get("params") or {}
    return Run(str(run_dir.relative_to(root)), rows, overrides, summary, config.get("objective", "eval_loss"),
               job_num if isinstance(job_num, int) else None, direction if isinstance(direction, str) else None,
               config, search_space if isinstance(search_space, dict) else {})


def load_study(directory: Path) -> Optional[Study]:
    """The Optuna study stored in `<directory>/optuna.db` (the one named hydralm, or the only one)."""
    path = directory / STUDY_FILE
    if not path.is_file():
        return None
    logging.getLogger("alembic").setLevel(logging.WARNING)  # optuna's SQLite schema setup chatter
    import optuna

    storage = f"sqlite:///{path.resolve()}"
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    if not names:
        return None
    study = optuna.load_study(study_name="hydralm" if "hydralm" in names else names[0], storage=storage)
    if len(study.directions) != 1:
        return None  # a multi-objective study has no single best
    trials = [Trial(t.number, t.state.name, t.value, dict(t.params)) for t in study.trials]
    return Study(study.study_name, study.direction.name.lower(), trials, study)


def log_scale_keys(runs: list[Run], study: Optional[Study]) -> set[str]:
    """The keys searched on a log scale: Optuna distributions with `log=True`, and sweeper
    params written `tag(log, ...)` (the Optuna sweeper's spelling)."""
    keys = {key for run in runs for key, spec in run.search_space.items()
            if re.match(r"\s*tag\(\s*log\s*,", str(spec))}
    if study is not None and study.optuna_study is not None:
        keys |= {name for trial in study.optuna_study.trials for name, distribution in trial.distributions.items()
                 if _log_scale(distribution)}
    return keys


def _log_scale(distribution) -> bool:
    """optuna 2.x: a LogUniform / IntLogUniform distribution; optuna 3: `log=True`."""
    return bool(getattr(distribution, "log", False)) or type(distribution).__name__ in (
        "LogUniformDistribution", "IntLogUniformDistribution")


def scheduled_lrs(run: Run) -> Optional[list[float]]:
    """The lr of every optimizer step 1..N as the run's schedule gives it: hydralm's own
    build_scheduler on a one-parameter optimizer with the run's optimizer.lr and scheduler keys,
    stepped as training steps it. N: the steps of a finished run, else train.max_steps. None
    when the schedule follows the eval loss, or the run's config does not say."""
    import warnings

    scheduler, optimizer_cfg = run.config.get("scheduler"), run.config.get("optimizer") or {}
    steps = run.summary.get("steps") or (run.config.get("train") or {}).get("max_steps")
    if not isinstance(scheduler, dict) or optimizer_cfg.get("lr") is None or not steps:
        return None
    import torch
    from omegaconf import OmegaConf

    from launcher.training.optim import EVAL_DRIVEN, PLATEAU_WITH_WARMUP, build_scheduler

    if scheduler.get("name") in (*EVAL_DRIVEN, PLATEAU_WITH_WARMUP):
        return None
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(optimizer_cfg["lr"]))
    lrs = []
    with warnings.catch_warnings():  # stepping the schedule without optimizer steps is the point
        warnings.simplefilter("ignore", UserWarning)
        schedule = build_scheduler(optimizer, OmegaConf.create(scheduler), int(steps))
        for _ in range(int(steps)):
            lrs.append(schedule.get_last_lr()[0])  # the lr step s trains with, as metrics.jsonl logs it
            schedule.step()
    return lrs


# ---------------------------------------------------------------------- what to show


def swept_keys(runs: list[Run]) -> list[str]:
    """Overrides whose value differs between runs (every override for a single run)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    if len(runs) == 1:
        return keys
    return [k for k in keys if len({run.overrides.get(k, "") for run in runs}) > 1]


def _best(items, value, direction: str):
    scored = [item for item in items if value(item) is not None and math.isfinite(value(item))]
    if not scored:
        return None
    return (max if direction == MAXIMIZE else min)(scored, key=value)


def _direction(runs: list[Run], study: Optional[Study]) -> str:
    if study is not None:
        return study.direction
    return next((run.direction for run in runs if run.direction), MINIMIZE)


def run_colours(count: int) -> list:
    """`count` distinct colours: tab10 up to 10 runs; beyond, the dark then the light shades of
    tab20, then tab20b and tab20c (60 in all) before any repeats."""
    import matplotlib

    if count <= 10:
        return list(matplotlib.colormaps["tab10"].colors[:count])
    tab20 = matplotlib.colormaps["tab20"].colors
    palette = [*tab20[0::2], *tab20[1::2]]
    for name in ("tab20b", "tab20c"):
        shades = matplotlib.colormaps[name].colors
        palette += [shades[group * 4 + shade] for shade in range(4) for group in range(5)]
    return [palette[i % len(palette)] for i in range(count)]


def _short(value: str) -> str:
    """An override value for a label or a cell: floats to 4 significant digits."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value and "e" not in value.lower() else f"{number:.4g}"


def _label(run: Run, keys: list[str]) -> str:
    return ", ".join(_short(run.overrides.get(k, "")) for k in keys) or run.name


# ---------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _outline() -> list:
    """A black edge around the best run's lines, whatever its colour."""
    from matplotlib import patheffects

    return [patheffects.Stroke(linewidth=4.2, foreground="black"), patheffects.Normal()]


def _legend(ax, runs: list[Run], keys: list[str]) -> None:
    """Beside the axes: one entry per run (its number and swept values), two columns past 20 runs."""
    title = "run: " + ", ".join(keys) if keys else "run"
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title=title, title_fontsize=7,
              ncol=2 if len(runs) > 20 else 1, frameon=False, borderaxespad=0.0)


def _curves(runs, keys, colours, best, out: Path, x: str, ys: list[str], title: str, ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    styles = {"train_loss": "-", "eval_loss": "--"}
    for run, colour in zip(runs, colours):
        is_best = run is best
        label = f"{'★ ' if is_best else ''}{run.name}: {_label(run, keys)}"  # one legend entry per run
        for y in ys:
            points = [(row[x], row[y]) for row in run.rows if x in row and y in row]
            if not points:
                continue
            ax.plot(*zip(*points), styles.get(y, "-"), color=colour, label=label, linewidth=2.6 if is_best else 1.2,
                    marker="o" if len(runs) <= 10 else None, markersize=3, zorder=3 if is_best else 2,
                    alpha=1.0 if is_best else 0.85, path_effects=_outline() if is_best else None)
            label = None
            if is_best and y == ys[-1]:
                ax.plot(*points[-1], marker="*", markersize=16, color=colour, markeredgecolor="black", zorder=4)
    ax.set(title=title, xlabel=x.replace("_", " "), ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(runs) > 1 or keys:
        _legend(ax, runs, keys)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def _lr_plot(runs, keys, colours, best, lrs: dict, log_y: bool, out: Path) -> None:
    """The lr of every step (its schedule) as a line, the logged values as dots."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    for run, colour in zip(runs, colours):
        is_best = run is best
        label = f"{'★ ' if is_best else ''}{run.name}: {_label(run, keys)}"
        logged = [(row["step"], row["lr"]) for row in run.rows if "step" in row and "lr" in row and "train_loss" in row]
        if lrs.get(run.name):
            ax.plot(range(1, len(lrs[run.name]) + 1), lrs[run.name], color=colour, label=label,
                    linewidth=2.6 if is_best else 1.2, zorder=3 if is_best else 2,
                    path_effects=_outline() if is_best else None)
            label = None
        if logged:
            ax.plot(*zip(*logged), "o", color=colour, label=label, markersize=3, zorder=4)
    ax.set(title="learning rate at every step (line: the schedule; dots: logged)", xlabel="step", ylabel="lr")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(runs) > 1 or keys:
        _legend(ax, runs, keys)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def _optuna_plots(study: Study, out_dir: Path, log_keys: set[str]) -> list[str]:
    """For a study of two or more parameters with two or more complete trials: the parameters'
    importances (optuna.importance with its mean-decrease-in-impurity evaluator: optuna 2.x's
    default fANOVA fails on numpy 2, and its importance plot on matplotlib >= 3.9, so the bars are
    drawn here) and a contour of the objective over the two most important parameters."""
    import warnings

    import optuna
    from optuna.importance import MeanDecreaseImpurityImportanceEvaluator

    complete = [t for t in study.trials if t.state == "COMPLETE" and t.value is not None]
    params = list(dict.fromkeys(k for t in complete for k in t.params))
    if study.optuna_study is None or len(params) < 2 or len(complete) < 2:
        return []
    plt = _pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.importances = dict(optuna.importance.get_param_importances(
            study.optuna_study, evaluator=MeanDecreaseImpurityImportanceEvaluator(seed=0)))
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(study.importances)), dpi=100)
        names = list(study.importances)[::-1]  # the most important on top
        ax.barh(names, [study.importances[n] for n in names], color="tab:blue")
        ax.set(title=f"parameter importance for the objective ({len(complete)} complete trials)",
               xlabel="importance (mean decrease in impurity, sums to 1)")
        ax.grid(alpha=0.3, axis="x")
        fig.savefig(out_dir / "optuna_importance.png", bbox_inches="tight")
        plt.close(fig)
    _contour_plot(study, list(study.importances)[:2], log_keys, out_dir / "optuna_contour.png")
    return ["optuna_importance.png", "optuna_contour.png"]


def _contour_plot(study: Study, params: list[str], log_keys: set[str], out: Path) -> None:
    """The objective of the complete trials over two parameters: the trials as points (the best
    starred) on a filled contour interpolated between them (matplotlib's tricontourf, over
    log10 of a parameter searched on a log scale). optuna 2.x's plot_contour mislabels log axes
    on current matplotlib, so it is drawn here."""
    import numpy as np

    plt = _pyplot()
    x_key, y_key = params
    trials = [t for t in study.trials if t.state == "COMPLETE" and t.value is not None
              and x_key in t.params and y_key in t.params]
    def axis(key):
        values = np.array([float(t.params[key]) for t in trials])
        return (np.log10(values), f"log10({key})") if key in log_keys else (values, key)
    (xs, x_label), (ys, y_label) = axis(x_key), axis(y_key)
    values = np.array([t.value for t in trials])
    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    try:
        filled = ax.tricontourf(xs, ys, values, levels=12, cmap="viridis_r" if study.direction == MINIMIZE else "viridis")
        fig.colorbar(filled, ax=ax, label="final objective")
    except (ValueError, RuntimeError):  # too few distinct points to triangulate: the points alone
        pass
    ax.scatter(xs, ys, c="white", edgecolors="black", s=30, zorder=3, label="trial")
    best = study.best
    if best in trials:
        index = trials.index(best)
        ax.scatter([xs[index]], [ys[index]], marker="*", s=260, color="tab:red", edgecolors="black", zorder=4,
                   label=f"best: trial {best.number}")
    ax.set(title=f"final objective over the two most important parameters ({study.direction})",
           xlabel=x_label, ylabel=y_label)
    ax.legend(loc="upper left", bbox_to_anchor=(1.25, 1.0), fontsize=8, frameon=False)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def _numbers(values: list[str]) -> Optional[list[float]]:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _objective_plot(runs, keys, colours, best, objective: str, direction: str, out: Path,
                    log_keys: frozenset = frozenset()) -> None:
    """One panel per swept key: each run's final objective against its value of that key; on a
    log axis when the key was searched on a log scale (`log_keys`), or, for a grid, when its
    values span a factor of 10 or more."""
    plt = _pyplot()
    scored = [(run, colour) for run, colour in zip(runs, colours) if run.objective_value is not None]
    columns = min(len(keys), 3)
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), dpi=100, squeeze=False,
                             sharey=True)
    for ax, key in zip(axes.flat, keys):
        values = [run.overrides.get(key, "") for run, _ in scored]
        numbers = _numbers(values)
        if numbers is None:  # a categorical key: one column per value
            categories = sorted(set(values))
            xs = [categories.index(v) for v in values]
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
        else:
            xs = numbers
            if min(xs) > 0 and (key in log_keys or max(xs) / min(xs) >= 10):
                ax.set_xscale("log")
        for x, (run, colour) in zip(xs, scored):
            is_best = run is best
            ax.scatter([x], [run.objective_value], color=colour, s=220 if is_best else 40, marker="*" if is_best else "o",
                       edgecolors="black", linewidths=0.8 if is_best else 0.3, zorder=3 if is_best else 2)
        ax.set(xlabel=key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"final {objective}")
    best_text = f"; ★ best: run {best.name}" if best is not None else ""
    fig.suptitle(f"final {objective} ({direction}d) against each swept key{best_text}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def _history_plot(study: Study, objective: str, out: Path) -> None:
    """Objective per trial (in trial order) and the best so far; failed trials at the bottom."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    complete = [t for t in study.trials if t.state == "COMPLETE" and t.value is not None]
    if complete:
        ax.scatter([t.number for t in complete], [t.value for t in complete], color="tab:blue", s=30,
                   label="trial", zorder=2)
        pick = max if study.direction == MAXIMIZE else min
        best_so_far, steps = None, []
        for t in complete:
            best_so_far = t.value if best_so_far is None else pick(best_so_far, t.value)
            steps.append((t.number, best_so_far))
        ax.step(*zip(*steps), where="post", color="tab:red", linewidth=2, label="best so far", zorder=1)
        best = study.best
        ax.scatter([best.number], [best.value], marker="*", s=260, color="tab:red", edgecolors="black",
                   label=f"best: trial {best.number}", zorder=3)
    others = [t for t in study.trials if t not in complete]
    if others:
        floor = ax.get_ylim()[0] if complete else 0.0
        ax.scatter([t.number for t in others], [floor] * len(others), marker="x", color="grey",
                   label="failed / not finished", zorder=2, clip_on=False)
    ax.set(title=f"Optuna study {study.name}: {len(study.trials)} trials ({study.direction})",
           xlabel="trial", ylabel=f"final {objective}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, borderaxespad=0.0)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------- tables


def _number(value: Optional[float], fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _table(runs: list[Run], keys: list[str], best: Optional[Run], objective: str) -> str:
    header = ["run", *keys, f"final {objective}", "steps", "tokens", "tokens/s", "wall time (s)", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for run in runs:
        cells = [run.name, *(_short(run.overrides.get(k, "")) for k in keys), _number(run.objective_value, ".4f"),
                 _number(run.last("step"), "d"), _number(run.last("tokens_seen"), "d"),
                 _number(run.tokens_per_s, ".0f"), _number(run.wall_time_s, ".1f"),
                 BEST_MARK if run is best and len(runs) > 1 else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _study_section(study: Study, runs: list[Run], objective: str) -> str:
    """The trials in order with the best so far, the run directory of each, and the best parameters."""
    run_of = {run.job_num: run.name for run in runs if run.job_num is not None}
    params = list(dict.fromkeys(k for t in study.trials for k in t.params))
    states = {}
    for t in study.trials:
        states[t.state.lower()] = states.get(t.state.lower(), 0) + 1
    best = study.best
    lines = [f"## Optuna study `{study.name}` ({study.direction})", "",
             f"{len(study.trials)} trials: " + ", ".join(f"{n} {state}" for state, n in states.items()) + "."]
    if best is not None:
        lines.append(f"Best: trial {best.number}, final {objective} {best.value:.4f}, with "
                     + ", ".join(f"`{k}={_short(str(v))}`" for k, v in best.params.items()) + ".")
    header = ["trial", "state", f"final {objective}", "best so far", *params, "run"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    pick = max if study.direction == MAXIMIZE else min
    best_so_far = None
    for t in study.trials:
        if t.state == "COMPLETE" and t.value is not None:
            best_so_far = t.value if best_so_far is None else pick(best_so_far, t.value)
        cells = [str(t.number), t.state.lower(), _number(t.value, ".4f"), _number(best_so_far, ".4f"),
                 *(_short(str(t.params[k])) if k in t.params else "" for k in params),
                 run_of.get(t.number, "") + (f" {BEST_MARK}" if t is best else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the report


def write_report(directory: Path, out_dir: Optional[Path] = None) -> dict:
    run_dirs = find_runs(directory)
    if not run_dirs:
        raise FileNotFoundError(f"{directory} holds no metrics.jsonl (neither a run nor a sweep of runs)")
    runs = [load_run(d, directory) for d in run_dirs]
    study = load_study(directory)
    keys = swept_keys(runs)
    named = [run.objective for run in runs]
    objective = max(set(named), key=named.count)  # the runs of one sweep name the same objective
    direction = _direction(runs, study)
    best = _best(runs, lambda run: run.objective_value, direction) if len(runs) > 1 else None
    colours = run_colours(len(runs))
    out_dir = out_dir or directory / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    curves = {
        "loss.png": ("tokens_seen", ["train_loss", "eval_loss"], "train (solid) and eval (dashed) loss", "loss"),
        "grad_norm.png": ("step", ["grad_norm"], "global gradient norm (before clipping), mean per logged interval",
                          "grad norm"),
        "tokens_per_s.png": ("step", ["tokens_per_s"], "throughput", "tokens/s"),
    }
    for name, (x, ys, title, ylabel) in curves.items():
        _curves(runs, keys, colours, best, out_dir / name, x, ys, title, ylabel)
    log_keys = log_scale_keys(runs, study)
    lrs = {run.name: scheduled_lrs(run) for run in runs}
    _lr_plot(runs, keys, colours, best, lrs, "optimizer.lr" in log_keys, out_dir / "lr.png")
    plots = ["loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"]
    if len(runs) > 1 and keys and any(run.objective_value is not None for run in runs):
        _objective_plot(runs, keys, colours, best, objective, direction, out_dir / "objective.png", frozenset(log_keys))
        plots.append("objective.png")
    if study is not None:
        _history_plot(study, objective, out_dir / "optuna_history.png")
        plots += ["optuna_history.png", *_optuna_plots(study, out_dir, log_keys)]

    table = _table(runs, keys, best, objective)
    verdict = ""
    if best is not None:
        verdict = (f"Objective: final {objective} ({direction}d). Best: run {best.name}, {best.objective_value:.4f}"
                   + (", with " + ", ".join(f"`{k}={_short(best.overrides.get(k, ''))}`" for k in keys) if keys else "")
                   + ".\n\n")
    sections = [f"# Runs in {directory}\n\n{verdict}{table}"]
    if study is not None:
        sections.append(_study_section(study, runs, objective))
    sections.append("\n".join(f"![{name}]({name})" for name in plots))
    report = out_dir / "report.md"
    report.write_text("\n\n".join(sections) + "\n")
    return {"report": str(report), "plots": [str(out_dir / n) for n in plots], "table": table,
            "lr_per_step": lrs, "log_axes": sorted(log_keys),
            "best_run": best.name if best is not None else None, "colours": dict(zip((r.name for r in runs), colours)),
            "study": None if study is None else {
                "name": study.name, "direction": study.direction, "trials": len(study.trials),
                "best_trial": study.best.number if study.best else None,
                "best_params": study.best.params if study.best else None,
                "best_value": study.best.value if study.best else None,
                "importances": study.importances}}


def check_report(cfg) -> None:
    """task=report's check: `report.dir` holds runs."""
    report = cfg.report
    if report.dir is None:
        raise ConfigError("report.dir must be set: a run directory or a multirun sweep directory")
    if not Path(report.dir).is_dir():
        raise ConfigError(f"report.dir={report.dir} does not exist")
    if not find_runs(Path(report.dir)):
        raise ConfigError(f"report.dir={report.dir} holds no metrics.jsonl (neither a run nor a sweep of runs)")


def print_report(result: dict) -> None:
    lines = [result["table"]]
    study = result["study"]
    if study is not None and study["best_trial"] is not None:
        params = ", ".join(f"{k}={_short(str(v))}" for k, v in study["best_params"].items())
        lines.append(f"\nOptuna study {study['name']}: {study['trials']} trials; best trial {study['best_trial']} "
                     f"({study['best_value']:.4f}): {params}")
    lines.append(f"\nhydralm: report -> {result['report']}")
    announce("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launcher.cli.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a run directory or a multirun sweep directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <dir>/report)")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.dir, args.out)
    except FileNotFoundError as err:
        parser.exit(2, f"hydralm: error: {err}\n")
    print_report(result)


if __name__ == "__main__":
    main()
