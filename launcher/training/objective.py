"""The number a sweep optimises: `objective` names a metric of the task's final evaluation.

A training task's result (its summary) holds the final evaluation as `final_eval`: `eval_loss`
and `eval_<metric>` for each name in the task's `metrics`; task=evaluate's result is itself an
evaluation. The job hands Hydra's sweeper that metric as a float (hydra-optuna-sweeper needs one;
the basic sweeper ignores it).
"""

from omegaconf import DictConfig

from launcher.errors import choice_error


def check_objective(cfg: DictConfig, metrics: tuple[str, ...]) -> None:
    """Before any work: `objective` is one of the metrics a training task with `metrics` reports."""
    valid = ["eval_loss", *(f"eval_{name}" for name in metrics)]
    if cfg.objective not in valid:
        raise choice_error("objective", cfg.objective, valid)


def objective_value(cfg: DictConfig, result):
    """The job's return value: the `objective` metric of `result` as a float, or `result` itself
    for tasks that do not evaluate (report, preprocess, export)."""
    if not isinstance(result, dict):
        return result
    evaluation = result.get("final_eval", result)
    if cfg.objective not in evaluation:
        return result
    return float(evaluation[cfg.objective])
