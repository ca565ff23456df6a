"""Cutting tokenized documents into training rows: numpy on flat token arrays, linear time.

A batch of documents is one flat token array plus offsets (Arrow's list layout). Every packing
mode is the same two steps: choose windows `[start, end)` over the flat array, then gather the
windows into rows with one vectorised index. No Python loop touches a token.

Modes (see docs/config.md, data section):
- `none`: one row per document, as long as it is;
- `truncate`: one row per document, cut to the row's content size;
- `partial`: each document cut on its own into windows of the content size;
- `full`: all documents as one stream cut into windows (streamed batch by batch with a carry,
  so memory is bounded by the batch, not the corpus).
Consecutive windows of one stream start `stride = content - overlap` tokens apart.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class PackingSpec:
    mode: str
    max_seq_len: int
    overlap: int = 0
    bos_eos: tuple[int, int] | None = None
    ignore_index: int = -100

    @property
    def content(self) -> int:
        """Content tokens per row: BOS and EOS take two of `max_seq_len`."""
        return self.max_seq_len - 2 if self.bos_eos else self.max_seq_len

    @property
    def stride(self) -> int:
        return self.content - self.overlap


@dataclass
class Documents:
    """Tokenized documents: `tokens[offsets[i]:offsets[i+1]]` is document `ids[i]`; `trained`
    (aligned with `tokens`; None: all) says which tokens are targets of the loss (a prompt, a
    chat's role headers and user turns are not)."""

    tokens: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    trained: np.ndarray | None = None

    @classmethod
    def from_lists(cls, docs: list[list[int]], prompt_lengths=None, ids=None, trained=None) -> "Documents":
        """From token lists, with per-document prompt lengths (the first tokens are not trained
        on) or per-token `trained` lists."""
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if prompt_lengths is not None:
            positions = np.arange(len(tokens)) - np.repeat(offsets[:-1], lengths)
            trained = positions >= np.repeat(np.asarray(prompt_lengths, dtype=np.int64), lengths)
        elif trained is not None:
            trained = np.concatenate([np.asarray(t, dtype=bool) for t in trained]) if docs else np.zeros(0, bool)
        return cls(
            tokens=tokens,
            offsets=offsets,
            ids=np.arange(len(docs), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64),
            trained=trained,
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def select(self, keep: np.ndarray) -> "Documents":
        """The documents where `keep` is true, in order (vectorised)."""
        if keep.all():
            return self
        lengths = np.diff(self.offsets)[keep]
        starts = self.offsets[:-1][keep]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gather = _ranges(starts, lengths, offsets)
        trained = None if self.trained is None else self.trained[gather]
        return Documents(self.tokens[gather], offsets, self.ids[keep], trained)


@dataclass
class TokenStream:
    """Documents laid end to end, the input of windowing: per token its id, label and position
    in its document; per document its start (relative to the stream; < 0 for a carried one)."""

    tokens: np.ndarray  # int32
    labels: np.ndarray | None  # None: the labels are the tokens (no prompt anywhere)
    positions: np.ndarray  # int32 position of each token in its document
    doc_starts: np.ndarray
    doc_ids: np.ndarray

    @classmethod
    def of(cls, docs: Documents, ignore_index: int) -> "TokenStream":
        lengths = np.diff(docs.offsets)
        starts = docs.offsets[:-1]
        positions = np.arange(len(docs.tokens), dtype=np.int32) - np.repeat(starts.astype(np.int32), lengths)
        labels = None
        if docs.trained is not None and not docs.trained.all():
            labels = np.where(docs.trained, docs.tokens, ignore_index)
        return cls(docs.tokens.astype(np.int32, copy=False), labels, positions, starts, docs.ids)

    def __len__(self) -> int:
        return len(self.tokens)

    def row_ids(self, starts: np.ndarray) -> np.ndarray:
        """The document id at each of these stream indices."""
        return self.doc_ids[np.searchsorted(self.doc_starts, starts, side="right") - 1]

    def tail(self, start: int) -> "TokenStream":
        keep = slice(max(0, np.searchsorted(self.doc_starts, start, side="right") - 1), None)
        labels = None if self.labels is None else self.labels[start:]
        return TokenStream(self.tokens[start:], labels, self.positions[start:], self.doc_starts[keep] - start,
                           self.doc_ids[keep])

    def __add__(self, other: "TokenStream") -> "TokenStream":
        labels = None
        if self.labels is not None or other.labels is not None:
            labels = np.concatenate([self.tokens if self.labels is None else self.labels,
                                     other.tokens if other.labels is None else other.labels])
        return TokenStream(np.concatenate([self.tokens, other.tokens]), labels,
                           np.concatenate([self.positions, other.positions]),
                           np.concatenate([self.doc_starts, other.doc_starts + len(self)]),
                           np.concatenate([self.doc_ids, other.doc_ids]))


def stream_windows(starts: np.ndarray, ends: np.ndarray, spec: PackingSpec) -> tuple[np.ndarray, np.ndarray]:
    """Windows over streams `[starts[i], ends[i])`, every stream to its end. Empty streams give none."""
    lengths = ends - starts
    if spec.mode == "none":
        keep = lengths > 0
        return starts[keep], ends[keep]
    if spec.mode == "truncate":
        keep = lengths > 0
        return starts[keep], np.minimum(ends, starts + spec.content)[keep]
    # Windows k = 0..K with K the first k whose window reaches the stream end.
    count = np.where(lengths > 0, 1 + np.maximum(0, -(-(lengths - spec.content) // spec.stride)), 0)
    stream = np.repeat(np.arange(len(starts)), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    window_starts = starts[stream] + k * spec.stride
    return window_starts, np.minimum(window_starts + spec.content, ends[stream])


def rows_table(stream: TokenStream, starts: np.ndarray, ends: np.ndarray, spec: PackingSpec) -> pa.Table:
    """Gather windows into rows: input_ids, labels, position_ids (restarting at each document
    inside a row; BOS counts as the first token of the first one) and id (the source document
    of the row's first content token)."""
    lengths = ends - starts
    n_rows, total = len(starts), int(lengths.sum())
    content_offsets = np.concatenate([[0], np.cumsum(lengths)])
    if n_rows and ends[-1] - starts[0] == total and (n_rows == 1 or (starts[1:] == ends[:-1]).all()):
        source = slice(int(starts[0]), int(ends[-1]))  # back-to-back windows (full, no overlap): views
    else:
        source = _ranges(starts, lengths, content_offsets)
    index_in_row = np.arange(total, dtype=np.int32) - np.repeat(content_offsets[:-1].astype(np.int32), lengths)
    in_doc = stream.positions[source]
    tokens = stream.tokens[source]
    labels = None if stream.labels is None else stream.labels[source]
    if spec.bos_eos:
        bos, eos = spec.bos_eos
        # The row's first document continues after BOS (position 0); later ones restart at 0.
        positions = np.where(in_doc >= index_in_row, index_in_row + 1, in_doc)
        offsets = content_offsets + 2 * np.arange(n_rows + 1)
        slots = np.arange(total) + np.repeat(2 * np.arange(n_rows) + 1, lengths)
        first, last = offsets[:-1], offsets[1:] - 1
        out = {"input_ids": _framed(tokens, slots, offsets[-1], first, bos, last, eos),
               "position_ids": _framed(positions, slots, offsets[-1], first, 0, last, positions[content_offsets[1:] - 1] + 1)}
        if labels is not None:
            # EOS is trained on unless the row ends inside a prompt.
            eos_labels = np.where(labels[content_offsets[1:] - 1] == spec.ignore_index, spec.ignore_index, eos)
            out["labels"] = _framed(labels, slots, offsets[-1], first, bos, last, eos_labels)
    else:
        offsets = content_offsets
        out = {"input_ids": tokens, "position_ids": np.minimum(in_doc, index_in_row)}
        if labels is not None:
            out["labels"] = labels
    arrow_offsets = pa.array(offsets, type=pa.int32())
    columns = {name: pa.ListArray.from_arrays(arrow_offsets, pa.array(values, type=pa.int32()))
               for name, values in out.items()}
    columns.setdefault("labels", columns["input_ids"])  # no prompt: labels are the tokens (shared buffer)
    columns["id"] = pa.array(stream.row_ids(starts) if n_rows else np.zeros(0, np.int64), type=pa.int64())
    return pa.table({name: columns[name] for name in ("input_ids", "labels", "position_ids", "id")})


def _framed(content: np.ndarray, slots: np.ndarray, size: int, first: np.ndarray, bos, last: np.ndarray, eos) -> np.ndarray:
    out = np.empty(size, dtype=np.int32)
    out[slots], out[first], out[last] = content, bos, eos
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray, out_offsets: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) for all i, without a loop."""
    total = int(out_offsets[-1])
    return np.arange(total, dtype=np.int64) + np.repeat(starts - out_offsets[:-1], lengths)


class Packer:
    """Feeds batches of documents through one packing mode; `full` carries the unfinished tail
    of the stream from one batch to the next, so rows never depend on batch boundaries."""

    def __init__(self, spec: PackingSpec):
        self.spec = spec
        self.carry: TokenStream | None = None
        self.rows_emitted = 0

    def add(self, docs: Documents) -> pa.Table:
        stream = TokenStream.of(docs, self.spec.ignore_index)
        if self.spec.mode != "full":
            starts, ends = stream_windows(docs.offsets[:-1], docs.offsets[1:], self.spec)
            return self._emit(stream, starts, ends)
        if self.carry is not None:
            stream = self.carry + stream
        # Emit only the windows that are complete; the rest waits for more tokens.
        complete = max(0, (len(stream) - self.spec.content) // self.spec.stride + 1)
        starts = np.arange(complete, dtype=np.int64) * self.spec.stride
        self.carry = stream.tail(complete * self.spec.stride)
        return self._emit(stream, starts, starts + self.spec.content)

    def finish(self) -> pa.Table:
        """The last, possibly short, windows of the `full` stream."""
        carry, self.carry = self.carry, None
        if carry is None or len(carry) == 0 or (self.rows_emitted and len(carry) <= self.spec.overlap):
            empty = TokenStream.of(Documents.from_lists([]), self.spec.ignore_index)
            return self._emit(empty, np.zeros(0, np.int64), np.zeros(0, np.int64))
        starts, ends = stream_windows(np.array([0]), np.array([len(carry)]), self.spec)
        return self._emit(carry, starts, ends)

    def _emit(self, stream: TokenStream, starts: np.ndarray, ends: np.ndarray) -> pa.Table:
        self.rows_emitted += len(starts)
        return rows_table(stream, starts, ends, self.spec)

