"""Data sources (`data.source`): where the examples come from.

Each source is a small class registered by name; `data.source` names it, or gives the dotted
path of a class of your own (same interface). A source checks its keys before any work
(`check`), loads Arrow-backed datasets (memory-mapped where they come from disk, never Python
lists of the whole corpus) and says what identifies their content (`fingerprint`), which is part
of the preprocessing cache key. A file it cannot read is one ConfigError naming the file.
`mixture` is a layer over sources: its components are sources of their own (`components`).
"""

import glob
import hashlib
import json
import logging
import math
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from stat import S_ISREG
from typing import Callable, Optional
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.errors import ConfigError, choice_error
from launcher.registry import Registry

SOURCES: Registry["DataSource"] = Registry("data.source")

# `files` source: file extension -> datasets builder.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".md": "text"}
# `files` source, .txt/.md: data.text_unit -> datasets' text builder `sample_by` (one example per
# file, per blank-line paragraph, or per line).
TEXT_UNITS = {"file": "document", "paragraph": "paragraph", "line": "line"}
HUB_PROBE_TIMEOUT_S = 3.0


class DataSource:
    """Raw examples: `splits()` gives {"train": Dataset, "eval": Dataset or None}; None means eval
    is every `data.eval_every`-th train example, held out during packing."""

    # True for sources whose rows are already tokenized and packed (no preprocessing).
    tokenized = False
    # True for a layer over other sources (`components()`), mixed after each is prepared.
    mixes = False
    # The data.* keys only this kind of source reads (SOURCE_KEYS): set under another source, such
    # a key is an error naming the sources that read it (check_foreign_keys). None (a source of
    # your own that declares nothing): not checked.
    keys: Optional[tuple[str, ...]] = None

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

    def describe(self, split: str) -> str:
        """The input of `split` ("train" or "eval"), as an error message names it."""
        return f"data.source={self.data.source}"

    def culprit(self, split: str, dataset, problem_of: Callable) -> tuple[str, str]:
        """(the input to name, its problem) for a problem `problem_of(dataset)` found in `split`;
        sources of several files name the file."""
        return self.describe(split), problem_of(dataset)


def source_of(data: DictConfig) -> DataSource:
    return SOURCES.get(data.source)(data)


# Files up to this size are identified by their content (xxh3-128, ~11 GB/s: reading is the cost);
# larger ones by size and modification time, which an edit in place that keeps both would fool
# (docs/runs.md: touch the file, or remove the cache entry, to rebuild).
CONTENT_HASH_BYTES = 64 * 1024 * 1024


# The keys that say where the examples are; each is read by some sources and ignored by the rest.
SOURCE_KEYS = ("load_path", "split", "eval_split", "text_unit", "train_ds", "eval_ds", "mixture")


def check_foreign_keys(data: DictConfig) -> None:
    """A source key (SOURCE_KEYS) set away from its schema default under a source that does not
    read it is an error naming the sources that do: `data.load_path=chat.jsonl` without
    `data=files` must not silently train the default corpus."""
    from launcher.schema import DataConfig

    source = SOURCES.get(data.source)
    if source.keys is None:
        return
    defaults = OmegaConf.structured(DataConfig)
    for key in SOURCE_KEYS:
        if key in source.keys or OmegaConf.select(data, key, throw_on_missing=False) == defaults[key]:
            continue
        readers = sorted(name for name in SOURCES.names() if key in (SOURCES.get(name).keys or ()))
        value = OmegaConf.select(data, key)
        hint = f"data={_likely_source(value)} data.{key}={value}" if key == "load_path" else f"data={readers[0]}"
        raise ConfigError(f"data.{key} is a key of data={'/'.join(readers)}; data={data.source} ignores it "
                          f"(choose the source, e.g. {hint})")


def _likely_source(load_path: str) -> str:
    """The source a `data.load_path` looks meant for, for the hint of check_foreign_keys: files of
    a supported type (or a directory of them) -> files, another directory -> disk, else hub."""
    path = Path(os.path.expanduser(load_path))
    if path.suffix.lower() in FILE_BUILDERS or (path.is_dir() and not (path / "dataset_info.json").is_file()
                                                 and not (path / "dataset_dict.json").is_file()):
        return "files"
    return "disk" if path.is_dir() else "hub"


def files_fingerprint(paths) -> str:
    digest = hashlib.sha256()
    for path in sorted(os.path.abspath(p) for p in paths):
        stat = os.stat(path)
        if not S_ISREG(stat.st_mode):  # a FIFO or /dev/zero would never end
            raise ConfigError(f"{path} is not a regular file (a FIFO, a device or a socket): data files must be "
                              f"regular files")
        if stat.st_size <= CONTENT_HASH_BYTES:
            digest.update(f"{path}\0{stat.st_size}\0{_content_digest(path)}\0".encode())
        else:
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _content_digest(path: str) -> str:
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 * 1024 * 1024), b""):
            digest.update(chunk)
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

    keys = ()  # eval is every data.eval_every-th topic

    def splits(self) -> dict:
        from datasets import Dataset

        return {"train": Dataset.from_dict({"text": [text for _, text in pydoc_documents()]}), "eval": None}

    def fingerprint(self, splits: dict) -> str:
        return text_fingerprint(text for _, text in pydoc_documents())

    def describe(self, split: str) -> str:
        return "the pydoc corpus"


def pydoc_documents() -> list[tuple[str, str]]:
    """(topic, text) pairs sorted by topic."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


@SOURCES.register("pydoc_chat")
class PydocChatSource(PydocSource):
    """The embedded corpus as conversations (a `messages` column, data.format=chat): for each
    topic a user asks about it and the assistant answers with the topic's text, a few paragraphs
    per turn, the user asking it to go on in between."""

    def splits(self) -> dict:
        from datasets import Dataset

        return {"train": Dataset.from_dict({"messages": pydoc_conversations()}), "eval": None}

    def fingerprint(self, splits: dict) -> str:
        return text_fingerprint(json.dumps(conversation) for conversation in pydoc_conversations())

    def describe(self, split: str) -> str:
        return "the pydoc_chat corpus"


PYDOC_SYSTEM = "You answer questions about Python from its reference documentation."
PYDOC_QUESTIONS = ("What does the Python documentation say about {}?", "Explain {} in Python.",
                   "Tell me about {}.", "How does {} work in Python?")
PYDOC_FOLLOW_UPS = ("Go on.", "Continue.", "What else?", "And then?")
PYDOC_TURN_CHARS = 1500


def pydoc_conversations() -> list[list[dict]]:
    """One conversation per pydoc topic (sorted by topic), the same on every Python of a version."""
    conversations = []
    for index, (topic, text) in enumerate(pydoc_documents()):
        question = PYDOC_QUESTIONS[index % len(PYDOC_QUESTIONS)].format(topic.replace("-", " "))
        messages = [{"role": "system", "content": PYDOC_SYSTEM}, {"role": "user", "content": question}]
        for turn, answer in enumerate(_paragraph_groups(text, PYDOC_TURN_CHARS)):
            if turn:
                messages.append({"role": "user", "content": PYDOC_FOLLOW_UPS[(index + turn) % len(PYDOC_FOLLOW_UPS)]})
            messages.append({"role": "assistant", "content": answer})
        conversations.append(messages)
    return conversations


def _paragraph_groups(text: str, size: int) -> list[str]:
    """Consecutive paragraphs of `text` joined into groups of about `size` characters."""
    groups, current = [], ""
    for paragraph in (p for p in text.split("\n\n") if p.strip()):
        if current and len(current) + len(paragraph) > size:
            groups.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return groups + [current] if current else groups


class SplitSource(DataSource):
    """A source of named splits: `data.split` to train on, `data.eval_split` (a split name) for
    eval; subclasses load one split (`_load`)."""

    def splits(self) -> dict:
        data = self.data
        return {"train": self._load(data.split), "eval": None if data.eval_split is None else self._load(data.eval_split)}

    def describe(self, split: str) -> str:
        return f"{self.data.load_path} (split {self.data.split if split == 'train' else self.data.eval_split})"

    def _load(self, split: str):
        raise NotImplementedError


@SOURCES.register("disk")
class DiskSource(SplitSource):
    """A dataset written by datasets' `save_to_disk` (a Dataset, or a DatasetDict and a split)."""

    keys = ("load_path", "split", "eval_split")

    @classmethod
    def check(cls, data: DictConfig) -> None:
        path = _required(data, "load_path")
        if not Path(path).is_dir():
            raise ConfigError(f"data.load_path={path} does not exist (a directory written by datasets' save_to_disk)")

    def _load(self, split: str):
        from datasets import DatasetDict, load_from_disk

        try:
            dataset = load_from_disk(self.data.load_path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{self.data.load_path}: not a dataset written by datasets' save_to_disk ({err})") from None
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ConfigError(f"data.split={split} is not a split of {self.data.load_path}; "
                                  f"available splits: {', '.join(dataset)}")
            return dataset[split]
        return dataset


@SOURCES.register("files")
class FilesSource(DataSource):
    """Local json/jsonl/csv/parquet/txt files or globs, one file type per split. A file that
    cannot be read is named in one ConfigError (`read_problem` says what is wrong with it)."""

    keys = ("load_path", "eval_split", "text_unit")

    @classmethod
    def check(cls, data: DictConfig) -> None:
        if data.text_unit not in TEXT_UNITS:
            raise choice_error("data.text_unit", data.text_unit, TEXT_UNITS)
        for key, pattern in (("data.load_path", _required(data, "load_path")), ("data.eval_split", data.eval_split)):
            if pattern is None:
                continue
            files = file_list(pattern, f"{key}={pattern}")
            if not files:
                holds = f"holds no {'/'.join(FILE_BUILDERS)} file" if os.path.isdir(os.path.expanduser(pattern)) else "matches no file"
                raise ConfigError(f"{key}={pattern} {holds}")
            file_builder(files, f"{key}={pattern}")
            for file in files:
                if os.path.getsize(file) == 0:
                    raise ConfigError(f"{file}: empty file (no rows)")

    def splits(self) -> dict:
        data = self.data
        return {"train": self._load(data.load_path), "eval": None if data.eval_split is None else self._load(data.eval_split)}

    def _load(self, pattern: str):
        files = file_list(pattern)
        if not files:
            raise ConfigError(f"no file matches {pattern}")
        builder = file_builder(files, pattern)
        try:
            return read_files(builder, files, self.data.text_unit)
        except Exception as err:  # noqa: BLE001 (datasets raises many kinds for an unreadable file)
            problem = read_problem(err, builder)
        where, problem = self._first_bad_file(files, builder) or (files[0] if len(files) == 1 else pattern, problem)
        raise ConfigError(f"{where}: {problem}") from None

    def _first_bad_file(self, files: list[str], builder: str, problem_of: Optional[Callable] = None):
        """(file, problem) of the first of several files that cannot be read alone, or whose
        columns have a problem (`problem_of`, by default the format's column check); None if none."""
        from launcher.data.formats import column_problem

        problem_of = problem_of or (lambda dataset: column_problem(dataset, self.data))
        for file in files if len(files) > 1 else []:
            try:
                problem = problem_of(read_files(builder, [file], self.data.text_unit))
            except Exception as err:  # noqa: BLE001
                problem = read_problem(err, builder)
            if problem:
                return file, problem
        return None

    def fingerprint(self, splits: dict) -> str:
        patterns = [self.data.load_path, self.data.eval_split]
        return files_fingerprint(f for pattern in patterns if pattern is not None for f in file_list(pattern))

    def describe(self, split: str) -> str:
        pattern = self.data.load_path if split == "train" else self.data.eval_split
        files = file_list(pattern)
        return files[0] if len(files) == 1 else pattern

    def culprit(self, split: str, dataset, problem_of: Callable) -> tuple[str, str]:
        pattern = self.data.load_path if split == "train" else self.data.eval_split
        files = file_list(pattern)
        return self._first_bad_file(files, file_builder(files, pattern), problem_of) or (self.describe(split), problem_of(dataset))


def file_list(pattern: str, key: Optional[str] = None) -> list[str]:
    """The files of `pattern`: an existing file is taken literally (`data[1].jsonl` is a name,
    not a glob); a directory gives the files of a supported type under it (FILE_BUILDERS, at any
    depth, hidden ones left out); anything else is a glob (`**` recursive). Sorted by path."""
    path = os.path.expanduser(pattern)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = (f for f in glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True)
                 if Path(f).suffix.lower() in FILE_BUILDERS)
    elif os.path.exists(path):  # a FIFO, /dev/zero, a socket: reading would hang or never end
        raise ConfigError(f"{key or pattern} is not a regular file (a FIFO, a device or a socket): data files "
                          f"must be regular files")
    else:
        found = glob.glob(path, recursive=True)
    return sorted(f for f in found if os.path.isfile(f))


def file_builder(files: list[str], key: str) -> str:
    builders = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders:
        raise ConfigError(f"{key}: unsupported file type; supported: {', '.join(FILE_BUILDERS)}")
    if len(builders) > 1:
        raise ConfigError(f"{key} mixes file types ({', '.join(sorted(builders))}); use one type per split")
    return builders.pop()


def read_files(builder: str, files: list[str], text_unit: str = "file"):
    """datasets.load_dataset(builder, data_files=files) as one split, without datasets' own error
    log lines (the caller reports a failure as one line). Text files give one example per
    `text_unit` (TEXT_UNITS): a file or paragraph keeps its newlines, a line does not."""
    from datasets import load_dataset

    options = {"sample_by": TEXT_UNITS[text_unit]} if builder == "text" else {}
    with _quiet("datasets"):  # data_files are patterns to datasets: escaped, they name exactly these files
        return load_dataset(builder, data_files=[glob.escape(f) for f in files], split="train", **options)


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_problem(err: BaseException, builder: str) -> str:
    """What is wrong with a file that datasets could not read, in words."""
    causes, cause = [], err
    while cause is not None and cause not in causes:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in causes:
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        if isinstance(cause, UnicodeDecodeError):
            return f"not UTF-8 text (byte 0x{cause.object[cause.start]:02x}: {cause.reason})"
        if isinstance(cause, StopIteration) or "corresponds to no data" in message or "at least one example" in message:
            return "no rows (only a header)" if builder == "csv" else "no rows (the file is empty or blank)"
        if builder == "json" and "JSON parse error" in message:
            return f"not valid JSON Lines ({message.removeprefix('JSON parse error: ')})"
        if builder == "parquet" and type(cause).__module__.startswith("pyarrow"):
            return f"not a readable Parquet file ({message})"
        if builder == "csv" and type(cause).__name__ == "ParserError":
            return f"not valid CSV ({message})"
    return f"cannot be read as {builder}: {type(causes[-1]).__name__}: {str(causes[-1]).strip()[:200]}"


@SOURCES.register("hub")
class HubSource(SplitSource):
    """`datasets.load_dataset(load_path, split=...)`. Without network, only the local datasets
    cache is tried (datasets' offline mode), so a missing dataset fails in seconds."""

    keys = ("load_path", "split", "eval_split")

    @classmethod
    def check(cls, data: DictConfig) -> None:
        _required(data, "load_path")

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
    """Datasets already tokenized and packed (by task=preprocess or VectorLM), read as they are.
    They must have `input_ids` and `labels` (and `position_ids` for data.document_mask); their
    token ids are checked against the tokenizer before training (launcher/data/preprocessing.py)."""

    tokenized = True
    keys = ("train_ds", "eval_ds")

    @classmethod
    def check(cls, data: DictConfig) -> None:
        for key in ("train_ds", "eval_ds"):
            path = _required(data, key)
            if not Path(path).is_dir():
                raise ConfigError(f"data.{key}={path} does not exist")
            columns = cls._load(path, f"data.{key}").column_names
            for column in ("input_ids", "labels") + (("position_ids",) if data.document_mask else ()):
                if column not in columns:
                    needs = " (data.document_mask=true needs it)" if column == "position_ids" else ""
                    raise ConfigError(f"data.{key}={path} has no {column} column{needs}; columns: {', '.join(columns)}")

    def splits(self) -> dict:
        return {"train": self._load(self.data.train_ds, "data.train_ds"),
                "eval": self._load(self.data.eval_ds, "data.eval_ds")}

    def describe(self, split: str) -> str:
        return f"data.{split}_ds={self.data[f'{split}_ds']}"

    @staticmethod
    def _load(path: str, key: str):
        from datasets import Dataset, load_from_disk

        try:
            dataset = load_from_disk(path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{key}={path} is not a dataset written by datasets' save_to_disk ({err})") from None
        if not isinstance(dataset, Dataset) or "input_ids" not in dataset.column_names:
            raise ConfigError(f"{key}={path} is not a preprocessed dataset with an input_ids column")
        return dataset


@SOURCES.register("mixture")
class MixtureSource(DataSource):
    """Several sources mixed by weight (launcher/data/mixture.py). `data.mixture` lists components,
    each `{weight: <number > 0>, preset: <a conf/data preset, optional>, <any data.* key>: ...}`:
    a data config of its own (schema defaults, then the preset, then the item's keys), except the
    keys in SHARED, which come from the top-level `data` for all components."""

    mixes = True
    keys = ("mixture",)
    SHARED = ("train_bs", "eval_bs", "ignore_index", "num_workers", "document_mask", "cache_dir", "num_proc", "save_path")

    @classmethod
    def check(cls, data: DictConfig) -> None:
        cls(data).components()

    def components(self) -> list[tuple[float, DictConfig]]:
        from launcher.schema import DataConfig

        items = self.data.mixture
        if not items:
            raise ConfigError("data.source=mixture needs data.mixture: a list of {weight, preset and/or data keys}")
        components = []
        for i, item in enumerate(items):
            key = f"data.mixture[{i}]"
            item = OmegaConf.to_container(item, resolve=True) if OmegaConf.is_config(item) else item
            if not isinstance(item, dict):
                raise ConfigError(f"{key} must be a mapping (weight, preset, data keys), not {item!r}")
            item = dict(item)
            weight = item.pop("weight", None)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise ConfigError(f"{key}.weight={weight} must be a number > 0")
            layers = [OmegaConf.structured(DataConfig)]
            preset = item.pop("preset", None)
            if preset is not None:
                layers.append(OmegaConf.load(_data_preset(preset, f"{key}.preset")))
            for name in [*self.SHARED, "mixture"]:
                if name in item:
                    raise ConfigError(f"{key}.{name}: set data.{name} once for the whole mixture")
            layers += [item, {name: self.data[name] for name in self.SHARED}]
            try:
                component = OmegaConf.merge(*layers)
            except OmegaConfBaseException as err:
                raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
            if OmegaConf.is_missing(component, "name"):
                component.name = preset or component.source
            if component.source != "mixture":
                from launcher.data.preprocessing import normalise_data

                normalise_data(component)
            if component.source == "mixture":
                raise ConfigError(f"{key}: a mixture component cannot itself be a mixture")
            components.append((float(weight), component))
        return components


def _data_preset(name: str, key: str) -> Path:
    import conf

    presets = Path(conf.__file__).parent / "data"
    path = presets / f"{name}.yaml"
    if not path.is_file():
        raise choice_error(key, name, sorted(p.stem for p in presets.glob("*.yaml") if p.stem != "mixture"))
    return path


@SOURCES.register("pydoc_pairs")
class PydocPairsSource(DataSource):
    """Preference pairs from the embedded corpus (task=dpo): from every other window of a
    topic's words, the prompt is the window's first PROMPT_WORDS words, `chosen` the
    RESPONSE_WORDS that follow, `rejected` those words shuffled (seeded by topic and window).
    Every `eval_every`-th topic is the eval split, so eval measures what carries over to unseen
    topics."""

    PROMPT_WORDS, RESPONSE_WORDS = 16, 24
    keys = ()

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
