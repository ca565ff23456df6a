"""Plots and a comparison table from the metrics.jsonl of one run, or of every run of a sweep.

    python -m launcher.report multirun/2026-11-28/01-04-45 [--out DIR]
    python -m launcher task=report report.dir=multirun/2026-11-28/01-04-45

Writes, to `<dir>/report` unless told otherwise: loss.png (train and eval loss vs tokens seen),
lr.png and tokens_per_s.png (vs optimizer step), and report.md: one row per run with the swept
overrides (from each run's .hydra/overrides.yaml) as columns, final eval loss, throughput and
wall time; the lowest final eval loss is marked best. Needs neither torch nor a model.
"""

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from launcher.errors import ConfigError

BEST_MARK = "★ best"


@dataclass
class Run:
    name: str  # the run directory relative to the report's directory ("." for a single run)
    rows: list[dict]
    overrides: dict[str, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def last(self, key: str) -> Optional[float]:
        return next((row[key] for row in reversed(self.rows) if key in row), None)

    @property
    def final_eval_loss(self) -> Optional[float]:
        return self.summary.get("final_eval_loss", self.last("eval_loss"))

    @property
    def wall_time_s(self) -> Optional[float]:
        return self.summary.get("train_wall_time_s", self.last("time_s"))

    @property
    def tokens_per_s(self) -> Optional[float]:
        if "tokens_per_s" in self.summary:
            return self.summary["tokens_per_s"]
        tokens, seconds = self.last("tokens_seen"), self.last("time_s")
        return tokens / seconds if tokens and seconds else None


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(directory: Path) -> list[Path]:
    """`directory` itself when it is a run, else every run below it (a sweep), in natural order."""
    if (directory / "metrics.jsonl").is_file():
        return [directory]
    return sorted((p.parent for p in directory.rglob("metrics.jsonl")), key=_natural_key)


def load_run(run_dir: Path, root: Path) -> Run:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed job
            continue
    overrides = {}
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        for override in yaml.safe_load(overrides_file.read_text()) or []:
            key, _, value = override.partition("=")
            if key.lstrip("+~") != "output_dir":
                overrides[key.lstrip("+~")] = value
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return Run(str(run_dir.relative_to(root)), rows, overrides, summary)


def swept_keys(runs: list[Run]) -> list[str]:
    """Overrides whose value differs between runs (every override for a single run)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    if len(runs) == 1:
        return keys
    return [k for k in keys if len({run.overrides.get(k, "") for run in runs}) > 1]


def _label(run: Run, keys: list[str]) -> str:
    return ", ".join(f"{k}={run.overrides.get(k, '')}" for k in keys) or run.name


def _plot(runs: list[Run], keys: list[str], out: Path, x: str, ys: list[str], title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    styles = {"train_loss": "-", "eval_loss": "--"}
    for i, run in enumerate(runs):
        for y in ys:
            points = [(row[x], row[y]) for row in run.rows if x in row and y in row]
            if points:
                suffix = f" ({y.split('_')[0]})" if len(ys) > 1 else ""
                ax.plot(*zip(*points), styles.get(y, "-"), marker="o", markersize=3, color=f"C{i % 10}",
                        label=_label(run, keys) + suffix)
    ax.set(title=title, xlabel=x.replace("_", " "), ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _number(value: Optional[float], fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _table(runs: list[Run], keys: list[str]) -> str:
    losses = [run.final_eval_loss for run in runs if run.final_eval_loss is not None]
    best = min(losses) if losses else None
    header = ["run", *keys, "final eval loss", "steps", "tokens", "tokens/s", "wall time (s)", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for run in runs:
        loss = run.final_eval_loss
        cells = [run.name, *(run.overrides.get(k, "") for k in keys), _number(loss, ".4f"),
                 _number(run.last("step"), "d"), _number(run.last("tokens_seen"), "d"),
                 _number(run.tokens_per_s, ".0f"), _number(run.wall_time_s, ".1f"),
                 BEST_MARK if loss is not None and loss == best and len(runs) > 1 else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(directory: Path, out_dir: Optional[Path] = None) -> dict:
    run_dirs = find_runs(directory)
    if not run_dirs:
        raise FileNotFoundError(f"{directory} holds no metrics.jsonl (neither a run nor a sweep of runs)")
    runs = [load_run(d, directory) for d in run_dirs]
    keys = swept_keys(runs)
    out_dir = out_dir or directory / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "loss.png": ("tokens_seen", ["train_loss", "eval_loss"], "train (solid) and eval (dashed) loss", "loss"),
        "lr.png": ("step", ["lr"], "learning rate", "lr"),
        "tokens_per_s.png": ("step", ["tokens_per_s"], "throughput", "tokens/s"),
    }
    for name, (x, ys, title, ylabel) in plots.items():
        _plot(runs, keys, out_dir / name, x, ys, title, ylabel)
    table = _table(runs, keys)
    images = "\n".join(f"![{name}]({name})" for name in plots)
    report = out_dir / "report.md"
    report.write_text(f"# Runs in {directory}\n\n{table}\n\n{images}\n")
    losses = [(run.final_eval_loss, run.name) for run in runs if run.final_eval_loss is not None]
    return {"report": str(report), "plots": [str(out_dir / n) for n in plots], "table": table,
            "best_run": min(losses)[1] if losses else None}


def check_report(cfg) -> None:
    """task=report's check: `report.dir` holds runs."""
    report = cfg.report
    if report.dir is None:
        raise ConfigError("report.dir must be set: a run directory or a multirun sweep directory")
    if not Path(report.dir).is_dir():
        raise ConfigError(f"report.dir={report.dir} does not exist")
    if not find_runs(Path(report.dir)):
        raise ConfigError(f"report.dir={report.dir} holds no metrics.jsonl (neither a run nor a sweep of runs)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launcher.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a run directory or a multirun sweep directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <dir>/report)")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.dir, args.out)
    except FileNotFoundError as err:
        parser.exit(2, f"hydralm: error: {err}\n")
    print(f"{result['table']}\n\nhydralm: report -> {result['report']}")


if __name__ == "__main__":
    main()
