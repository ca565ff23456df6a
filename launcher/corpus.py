"""The embedded default corpus: the documentation topics that every CPython ships."""

import hashlib


def pydoc_documents() -> list[tuple[str, str]]:
    """(topic, text) pairs sorted by topic, so every Python of one version yields the same list."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def split_pydoc(eval_every: int) -> dict[str, list[str]]:
    """Deterministic train/eval split: every `eval_every`-th topic (in sorted order) is eval."""
    docs = pydoc_documents()
    return {
        "train": [text for i, (_, text) in enumerate(docs) if i % eval_every != 0],
        "eval": [text for i, (_, text) in enumerate(docs) if i % eval_every == 0],
    }


def fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()
