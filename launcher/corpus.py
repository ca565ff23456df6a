"""Raw text sources (`data.source`): the embedded pydoc corpus, a dataset saved on disk, local
files, or the HuggingFace Hub. Each gives Arrow-backed datasets (memory-mapped where they come
from disk), never Python lists of the whole corpus."""

import glob
import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from omegaconf import DictConfig

from launcher.errors import ConfigError

# `files` source: file extension -> datasets builder.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
HUB_PROBE_TIMEOUT_S = 3.0


def pydoc_documents() -> list[tuple[str, str]]:
    """(topic, text) pairs sorted by topic, so every Python of one version yields the same list."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def raw_splits(data: DictConfig) -> dict[str, Dataset | None]:
    """{"train": dataset, "eval": dataset or None}. None: eval is every `data.eval_every`-th
    example of train, held out during packing."""
    if data.source == "pydoc":
        return {"train": Dataset.from_dict({"text": [text for _, text in pydoc_documents()]}), "eval": None}
    if data.source == "disk":
        load = lambda split: _from_disk(data.load_path, split)  # noqa: E731
    elif data.source == "files":
        load = lambda files: _from_files(files)  # noqa: E731
    elif data.source == "hub":
        load = lambda split: _from_hub(data.load_path, split)  # noqa: E731
    else:
        raise ConfigError(f"data.source={data.source} has no raw corpus to preprocess")
    train = load(data.load_path if data.source == "files" else data.split)
    return {"train": train, "eval": None if data.eval_split is None else load(data.eval_split)}


def source_fingerprint(data: DictConfig, dataset: Dataset | None) -> str | None:
    """Identity of a raw dataset for the preprocessing cache."""
    if dataset is None:
        return None
    if data.source == "pydoc":
        return fingerprint([text for _, text in pydoc_documents()])
    return dataset._fingerprint  # datasets' content/provenance hash (state.json, file hashes, hub revision)


def _from_disk(path: str, split: str) -> Dataset:
    dataset = load_from_disk(path)
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ConfigError(f"data.split={split} is not a split of {path}; available splits: {', '.join(dataset)}")
        return dataset[split]
    return dataset


def file_list(pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.expanduser(pattern), recursive=True))


def file_builder(files: list[str], key: str) -> str:
    builders = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders:
        raise ConfigError(f"{key}: unsupported file type; supported: {', '.join(FILE_BUILDERS)}")
    if len(builders) > 1:
        raise ConfigError(f"{key} mixes file types ({', '.join(sorted(builders))}); use one type per split")
    return builders.pop()


def _from_files(pattern: str) -> Dataset:
    files = file_list(pattern)
    if not files:
        raise ConfigError(f"no file matches {pattern}")
    return load_dataset(file_builder(files, pattern), data_files=files, split="train")


def _hub_reachable() -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _from_hub(name: str, split: str) -> Dataset:
    """`load_dataset(name, split=split)`. Without network, only the local datasets cache is
    tried (datasets' offline mode), so a missing dataset fails in seconds instead of retrying."""
    import datasets.config
    import huggingface_hub.constants

    offline = datasets.config.HF_HUB_OFFLINE or not _hub_reachable()
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = offline
    try:
        return load_dataset(name, split=split)
    except Exception as err:
        why = "the Hub is unreachable (offline) and it is not in the local datasets cache" if offline else str(err)
        raise ConfigError(
            f"data.source=hub cannot load data.load_path={name} split={split}: {why}; "
            "save it with datasets' save_to_disk where there is network and use data.source=disk"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
