"""Helpers the benchmark scripts share: subprocess runs, medians, the config tree."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def subprocess_env(threads: int | None = None, **extra: str) -> dict:
    """The environment of a measured child: this checkout importable, same thread count for all."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return {**env, **extra}


def run_checked(cmd: list[str], env: dict, cwd: Path | None = None, timeout: float = 1800) -> str:
    """Run `cmd`; return its stdout, or exit with its stderr if it failed."""
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"benchmark child failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
    return result.stdout


def last_json_line(text: str) -> dict:
    """Children print one JSON object as their last line of stdout."""
    return json.loads(text.strip().splitlines()[-1])


def publish(result: dict, json_path: Path | None, ratios: dict[str, float] | None = None) -> dict:
    """A benchmark's ending: `result` to --json (what `python -m bench` reads), then its
    `ratio <name>: <value>` lines, last (what readers and the smoke tests look for)."""
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    for name, value in (ratios or {}).items():
        print(f"ratio {name}: {value:.3f}")
    return result


def median(values: list[float]) -> float:
    return statistics.median(values)


def compose(overrides: list[str]):
    """The launcher's composed config, exactly as `python -m launcher OVERRIDES` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import launcher.schema  # noqa: F401  (registers the schema the config tree names)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)
