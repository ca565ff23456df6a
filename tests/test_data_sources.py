"""Data sources: a key of another source is an error naming the source to choose; plain text
files and folders are read one document per file (or paragraph), newlines kept, then packed."""

import pytest
from conftest import compose_config
from datasets import load_from_disk

from launcher.cli.app import run_task
from launcher.data.preprocessing import check_data
from launcher.data.sources import SOURCE_KEYS, SOURCES, check_foreign_keys
from launcher.errors import ConfigError
from launcher.model.modeling import load_tokenizer

# A value for each source key, as a user would set it on the command line.
KEY_VALUES = {"load_path": "data/chat.jsonl", "split": "validation", "eval_split": "data/val.jsonl",
              "text_unit": "paragraph", "train_ds": "/data/train", "eval_ds": "/data/eval",
              "mixture": "[{preset: pydoc, weight: 1}]"}
# Which sources read which key: written out here, not read from hydralm.
READERS = {"load_path": ["disk", "files", "hub"], "split": ["disk", "hub"], "eval_split": ["disk", "files", "hub"],
           "text_unit": ["files"], "train_ds": ["preprocessed"], "eval_ds": ["preprocessed"], "mixture": ["mixture"]}
SOURCE_NAMES = ["pydoc", "pydoc_chat", "pydoc_pairs", "disk", "files", "hub", "preprocessed", "mixture"]


def test_every_source_and_key_is_covered():
    assert set(SOURCES.names()) == set(SOURCE_NAMES) and set(SOURCE_KEYS) == set(KEY_VALUES)


@pytest.mark.parametrize("source", SOURCE_NAMES)
@pytest.mark.parametrize("key", sorted(KEY_VALUES))
def test_a_key_of_another_source_names_the_sources_that_read_it(source, key):
    cfg = compose_config([f"data={source}", f"data.{key}={KEY_VALUES[key]}"])
    if source in READERS[key]:
        check_foreign_keys(cfg.data)
        return
    with pytest.raises(ConfigError) as err:
        check_foreign_keys(cfg.data)
    assert str(err.value).startswith(f"data.{key} is a key of data={'/'.join(READERS[key])}; data={source} ignores it")


def test_the_users_command_does_not_silently_train_pydoc():
    """`python -m launcher data.load_path=data/chat.jsonl`: refused before any work, with the source to choose."""
    with pytest.raises(ConfigError) as err:
        check_data(compose_config(["data.load_path=data/chat.jsonl"]))
    assert str(err.value) == ("data.load_path is a key of data=disk/files/hub; data=pydoc ignores it "
                              "(choose the source, e.g. data=files data.load_path=data/chat.jsonl)")


def test_a_mixture_component_with_a_key_its_source_ignores_is_refused():
    cfg = compose_config(["data=mixture", "data.mixture=[{preset: pydoc, weight: 1, load_path: a.jsonl}]"])
    with pytest.raises(ConfigError, match="data.load_path is a key of data=disk/files/hub; data=pydoc ignores it"):
        check_data(cfg)


def test_an_unknown_text_unit_lists_the_valid_ones(tmp_path):
    (tmp_path / "a.txt").write_text("a\n")
    cfg = compose_config(["data=files", f"data.load_path={tmp_path}", "data.text_unit=sentence"])
    with pytest.raises(ConfigError, match="data.text_unit='sentence' is not valid; choose one of: file, paragraph, line"):
        check_data(cfg)


# ---------------------------------------------------------------------- plain text

DOCS = {
    "a.txt": "The first document.\nIts second line.\n\nA second paragraph,\nover two lines.\n",
    "b.md": "# Notes\n\nSome *markdown* text.\n\n\n\nAfter three blank lines.",
    "sub/c.txt": "One more file, in a sub-folder, long enough to need more than one row of the packing: "
                 + " ".join(f"word{i}" for i in range(40)) + "\n",
}
MAX_SEQ_LEN = 24


@pytest.fixture
def text_folder(tmp_path):
    root = tmp_path / "texts"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "image.png").write_bytes(b"\x89PNG not text")  # not a supported type: left out
    (root / ".hidden.txt").write_text("a hidden file")  # hidden: left out
    return root


def _packed_reference(tokenizer, documents: list[str]) -> list[list[int]]:
    """data.packing_type=partial with BOS/EOS (docs/config.md): each document on its own, its
    tokens cut into windows of max_seq_len - 2, each window framed BOS ... EOS."""
    rows, content = [], MAX_SEQ_LEN - 2
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows += [[tokenizer.bos_token_id, *ids[i:i + content], tokenizer.eos_token_id] for i in range(0, len(ids), content)]
    return rows


def _preprocessed_train_rows(tmp_path, overrides) -> list[list[int]]:
    save = tmp_path / "prepared"
    # data.eval_split: the eval examples come from their own file, so every document is trained on
    (tmp_path / "eval.txt").write_text("held-out text\n")
    cfg = compose_config(["task=preprocess", "data=files", f"train.max_seq_len={MAX_SEQ_LEN}", f"data.save_path={save}",
                          f"data.eval_split={tmp_path / 'eval.txt'}", f"output_dir={tmp_path / 'run'}", *overrides])
    run_task(cfg)
    return load_from_disk(str(save / "train"))["input_ids"]


@pytest.mark.parametrize("spelling", ["folder", "glob"])
def test_a_folder_or_glob_of_text_files_is_one_document_per_file(tmp_path, text_folder, spelling):
    """A folder: its .txt/.md files at any depth (not the .png, not the hidden file); a glob: what
    it matches. Sorted by path, each file one document, newlines kept."""
    tokenizer = load_tokenizer(compose_config().model)
    path, names = (text_folder, sorted(DOCS)) if spelling == "folder" else (f"{text_folder}/**/*.txt", ["a.txt", "sub/c.txt"])
    rows = _preprocessed_train_rows(tmp_path, [f"data.load_path='{path}'"])
    assert rows == _packed_reference(tokenizer, [DOCS[name] for name in names])


def test_text_paragraphs_are_split_at_blank_lines(tmp_path, text_folder):
    tokenizer = load_tokenizer(compose_config().model)
    rows = _preprocessed_train_rows(tmp_path, [f"data.load_path={text_folder}", "data.text_unit=paragraph"])
    paragraphs = [p for name in sorted(DOCS) for p in DOCS[name].split("\n\n") if p]
    assert rows == _packed_reference(tokenizer, paragraphs)
