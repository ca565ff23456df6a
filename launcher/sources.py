"""Data sources (`data.source`): where the examples come from.

Each source is a small class registered by name; `data.source` names it, or gives the dotted
path of a class of your own (same interface). A source checks its keys before any work
(`check`), loads Arrow-backed datasets (memory-mapped where they come from disk, never Python
lists of the whole corpus) and says what identifies their content (`fingerprint`), which is part
of the preprocessing cache key.
"""

import glob
import hashlib
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError
from launcher.registry import Registry

SOURCES: Registry["DataSource"] = Registry("data.source")

# `files` source: file extension -> datasets builder.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
HUB_PROBE_TIMEOUT_S = 3.0


class DataSource:
    """Raw examples: `splits()` gives {"train": Dataset, "eval": Dataset or None}; None means eval
    is every `data.eval_every`-th train example, held out during packing."""

    # True for sources whose rows are already tokenized and packed (no preprocessing).
    tokenized = False

    def __init__(self, data: DictConfig):
        self.data = data

    @classmethod
    def check(cls, data: DictConfig) -> None:
        """Cheap checks of this source's keys, before any loading."""

    def splits(self) -> dict:
        raise NotImplementedError

    def fingerprint(self, splits: dict) -> str:
        """What identifies the content of `splits` (as `splits()` gave them): by default their
        backing Arrow files, by path, size and modification time."""
        return files_fingerprint(entry["filename"] for dataset in splits.values() if dataset is not None
                                 for entry in dataset.cache_files)


def source_of(data: DictConfig) -> DataSource:
    return SOURCES.get(data.source)(data)


def files_fingerprint(paths) -> str:
    digest = hashlib.sha256()
    for path in sorted(os.path.abspath(p) for p in paths):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def text_fingerprint(texts) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _required(data: DictConfig, key: str) -> str:
    value = OmegaConf.select(data, key, throw_on_missing=False)
    if value is None or OmegaConf.is_missing(data, key):
        raise ConfigError(f"data.{key} must be set for data.source={data.source}")
    return value


@SOURCES.register("pydoc")
class PydocSource(DataSource):
    """The embedded corpus: CPython's pydoc topics, sorted by name (the same list on every
    Python of one version)."""

    @classmethod
    def check(cls, data: DictConfig) -> None:
        if data.eval_split is not None:
            raise ConfigError("data.eval_split does not apply to data.source=pydoc (eval is every data.eval_every-th topic)")

    def splits(self) -> dict:
        from datasets import Dataset

        return {"train": Dataset.from_dict({"text": [text for _, text in pydoc_documents()]}), "eval": None}

    def fingerprint(self, splits: dict) -> str:
        return text_fingerprint(text for _, text in pydoc_documents())


def pydoc_documents() -> list[tuple[str, str]]:
    """(topic, text) pairs sorted by topic."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


@SOURCES.register("disk")
class DiskSource(DataSource):
    """A dataset written by datasets' `save_to_disk` (a Dataset, or a DatasetDict and a split)."""

    @classmethod
    def check(cls, data: DictConfig) -> None:
        path = _required(data, "load_path")
        if not Path(path).is_dir():
            raise ConfigError(f"data.load_path={path} does not exist (a directory written by datasets' save_to_disk)")

    def splits(self) -> dict:
        data = self.data
        return {"train": self._load(data.split), "eval": None if data.eval_split is None else self._load(data.eval_split)}

    def _load(self, split: str):
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(self.data.load_path)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ConfigError(f"data.split={split} is not a split of {self.data.load_path}; "
                                  f"available splits: {', '.join(dataset)}")
            return dataset[split]
        return dataset


@SOURCES.register("files")
class FilesSource(DataSource):
    """Local json/jsonl/csv/parquet/txt files or globs, one file type per split."""

    @classmethod
    def check(cls, data: DictConfig) -> None:
        for key, pattern in (("data.load_path", _required(data, "load_path")), ("data.eval_split", data.eval_split)):
            if pattern is None:
                continue
            files = file_list(pattern)
            if not files:
                raise ConfigError(f"{key}={pattern} matches no file")
            file_builder(files, f"{key}={pattern}")

    def splits(self) -> dict:
        data = self.data
        return {"train": self._load(data.load_path), "eval": None if data.eval_split is None else self._load(data.eval_split)}

    def _load(self, pattern: str):
        from datasets import load_dataset

        files = file_list(pattern)
        if not files:
            raise ConfigError(f"no file matches {pattern}")
        return load_dataset(file_builder(files, pattern), data_files=files, split="train")

    def fingerprint(self, splits: dict) -> str:
        patterns = [self.data.load_path, self.data.eval_split]
        return files_fingerprint(f for pattern in patterns if pattern is not None for f in file_list(pattern))


def file_list(pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.expanduser(pattern), recursive=True))


def file_builder(files: list[str], key: str) -> str:
    builders = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders:
        raise ConfigError(f"{key}: unsupported file type; supported: {', '.join(FILE_BUILDERS)}")
    if len(builders) > 1:
        raise ConfigError(f"{key} mixes file types ({', '.join(sorted(builders))}); use one type per split")
    return builders.pop()


@SOURCES.register("hub")
class HubSource(DataSource):
    """`datasets.load_dataset(load_path, split=...)`. Without network, only the local datasets
    cache is tried (datasets' offline mode), so a missing dataset fails in seconds."""

    @classmethod
    def check(cls, data: DictConfig) -> None:
        _required(data, "load_path")

    def splits(self) -> dict:
        data = self.data
        return {"train": self._load(data.split), "eval": None if data.eval_split is None else self._load(data.eval_split)}

    def _load(self, split: str):
        import datasets.config
        import huggingface_hub.constants
        from datasets import load_dataset

        name = self.data.load_path
        offline = datasets.config.HF_HUB_OFFLINE or not _hub_reachable()
        saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = offline
        try:
            return load_dataset(name, split=split)
        except Exception as err:  # noqa: BLE001 (datasets raises many kinds for a missing dataset)
            why = "the Hub is unreachable (offline) and it is not in the local datasets cache" if offline else str(err)
            raise ConfigError(
                f"data.source=hub cannot load data.load_path={name} split={split}: {why}; "
                "save it with datasets' save_to_disk where there is network and use data.source=disk"
            ) from None
        finally:
            datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hub_reachable() -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@SOURCES.register("preprocessed")
class PreprocessedSource(DataSource):
    """Datasets already tokenized and packed (by task=preprocess or VectorLM), read as they are."""

    tokenized = True

    @classmethod
    def check(cls, data: DictConfig) -> None:
        for key in ("train_ds", "eval_ds"):
            path = _required(data, key)
            if not Path(path).is_dir():
                raise ConfigError(f"data.{key}={path} does not exist")

    def splits(self) -> dict:
        return {"train": self._load(self.data.train_ds, "data.train_ds"),
                "eval": self._load(self.data.eval_ds, "data.eval_ds")}

    @staticmethod
    def _load(path: str, key: str):
        from datasets import Dataset, load_from_disk

        dataset = load_from_disk(path)
        if not isinstance(dataset, Dataset) or "input_ids" not in dataset.column_names:
            raise ConfigError(f"{key}={path} is not a preprocessed dataset with an input_ids column")
        return dataset


@SOURCES.register("pydoc_pairs")
class PydocPairsSource(DataSource):
    """Preference pairs from the embedded corpus (task=dpo): from every other window of a
    topic's words, the prompt is the window's first PROMPT_WORDS words, `chosen` the
    RESPONSE_WORDS that follow, `rejected` those words shuffled (seeded by topic and window).
    Every `eval_every`-th topic is the eval split, so eval measures what carries over to unseen
    topics."""

    PROMPT_WORDS, RESPONSE_WORDS = 16, 24

    @classmethod
    def check(cls, data: DictConfig) -> None:
        PydocSource.check(data)

    def splits(self) -> dict:
        from datasets import Dataset

        splits = {"train": [], "eval": []}
        for index, (topic, text) in enumerate(pydoc_documents()):
            splits["eval" if index % self.data.eval_every == 0 else "train"] += self.pairs(topic, text)
        return {name: Dataset.from_list(rows) for name, rows in splits.items()}

    @classmethod
    def pairs(cls, topic: str, text: str) -> list[dict]:
        import random

        words, size, rows = text.split(), cls.PROMPT_WORDS + cls.RESPONSE_WORDS, []
        for start in range(0, len(words) - size + 1, 2 * size):
            prompt, response = words[start:start + cls.PROMPT_WORDS], words[start + cls.PROMPT_WORDS:start + size]
            shuffled = random.Random(f"{topic}:{start}").sample(response, len(response))
            if shuffled != response:
                rows.append({"prompt": " ".join(prompt), "chosen": " " + " ".join(response),
                             "rejected": " " + " ".join(shuffled)})
        return rows

    def fingerprint(self, splits: dict) -> str:
        return text_fingerprint(f"{name}\0{row['prompt']}\0{row['chosen']}\0{row['rejected']}"
                                for name, dataset in splits.items() for row in dataset)
