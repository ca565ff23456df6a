"""Mixing prepared datasets by weight (data.source=mixture, components in data.mixture).

Each component is prepared on its own (its source, format and options; cached under its own
key), then the train split of the mixture draws from component i a share weight_i / sum(weights)
of N rows, N being the components' train rows together: a component is cycled (its rows in a
seeded order, repeated) or subsampled to its share. The draw depends only on train.seed and the
components' sizes, so every rank, every rerun and every resumed run sees the same rows in the
same order (the sampler then holds the position). The eval split is all components' eval rows.
"""

from dataclasses import dataclass

import numpy as np
from datasets import Dataset, concatenate_datasets
from omegaconf import DictConfig


@dataclass
class Part:
    weight: float
    data: DictConfig  # the component's own data config
    splits: dict  # {"train", "eval"}: its prepared rows


def mix(parts: list[Part], seed: int) -> tuple[dict[str, Dataset], dict]:
    """{"train", "eval"} of the mixture and its report (what each component contributes)."""
    sizes = np.array([len(part.splits["train"]) for part in parts])
    shares = np.array([part.weight for part in parts], dtype=np.float64)
    shares /= shares.sum()
    counts = _apportion(shares, int(sizes.sum()))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    drawn = [start + np.resize(np.random.default_rng([seed, i]).permutation(size), count)
             for i, (start, size, count) in enumerate(zip(starts, sizes, counts))]
    columns = _common_columns([split for part in parts for split in part.splits.values()])
    train = _concatenate([part.splits["train"] for part in parts], columns).select(np.concatenate(drawn))
    evaluation = _concatenate([part.splits["eval"] for part in parts], columns)
    report = {
        "seed": seed,
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "components": [{
            "source": describe_component(part.data),
            "format": part.data.get("format"),
            "weight": part.weight,
            "proportion": count / max(1, len(train)),
            "train_rows": int(size),
            "rows_drawn": int(count),
            "passes_over_its_rows": count / size,
            "eval_rows": len(part.splits["eval"]),
        } for part, size, count in zip(parts, sizes, counts)],
    }
    return {"train": train, "eval": evaluation}, report


def _apportion(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `shares` (largest remainders)."""
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts


def _common_columns(datasets: list[Dataset]) -> list[str]:
    columns = [c for c in ("input_ids", "labels", "position_ids", "id") if all(c in d.column_names for d in datasets)]
    return columns


def _concatenate(datasets: list[Dataset], columns: list[str]) -> Dataset:
    datasets = [d.select_columns(columns) for d in datasets]
    features = datasets[0].features
    return concatenate_datasets([d if d.features == features else d.cast(features) for d in datasets])


def describe_component(data: DictConfig) -> str:
    where = data.get("load_path") or data.get("train_ds")
    return f"{data.name or data.source}" + (f" ({where})" if where else "")


def describe_mixture(report: dict) -> str:
    return "\n".join(
        f"  {c['source']}, format {c['format']}, weight {c['weight']:g}: {c['proportion']:.1%} of "
        f"{report['train_rows']} train rows ({c['rows_drawn']} drawn from its {c['train_rows']}, "
        f"{c['passes_over_its_rows']:.2f} passes); {c['eval_rows']} eval rows"
        for c in report["components"])
