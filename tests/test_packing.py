"""Packing (launcher.data.packing): golden rows for hand-written documents, and properties over random
token streams and option combinations (hypothesis)."""

import numpy as np
import pyarrow as pa
from conftest import pack
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.data.loaders import PadCollator
from launcher.data.packing import Documents, Packer, PackingSpec

BOS, EOS, IGNORE = 0, 1, -100
DOCS = [[10, 11, 12], [13, 14, 15, 16, 17, 18], [19, 20, 21, 22]]


def _rows(docs, spec, prompt_lengths=None):
    return pack(Documents.from_lists(docs, prompt_lengths), spec).to_pylist()


def _column(rows, name):
    return [r[name] for r in rows]


# ---- golden rows, one group per option -------------------------------------------------------

def test_full_packing_with_bos_eos_frames_every_chunk():
    rows = _rows(DOCS, PackingSpec("full", 6, bos_eos=(BOS, EOS)))
    assert _column(rows, "input_ids") == [
        [0, 10, 11, 12, 13, 1], [0, 14, 15, 16, 17, 1], [0, 18, 19, 20, 21, 1], [0, 22, 1],
    ]
    assert _column(rows, "position_ids") == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3], [0, 1, 2]]
    assert _column(rows, "labels") == _column(rows, "input_ids")
    assert _column(rows, "id") == [0, 1, 1, 2]


def test_full_packing_without_special_tokens_loses_nothing():
    rows = _rows(DOCS, PackingSpec("full", 5))
    assert _column(rows, "input_ids") == [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19], [20, 21, 22]]
    assert _column(rows, "position_ids") == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0], [0, 1, 2]]


def test_full_packing_with_overlap_repeats_the_window_tail():
    rows = _rows(DOCS, PackingSpec("full", 5, overlap=2))
    assert _column(rows, "input_ids") == [[10, 11, 12, 13, 14], [13, 14, 15, 16, 17], [16, 17, 18, 19, 20], [19, 20, 21, 22]]
    assert _column(rows, "position_ids") == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 1, 2, 3]]


def test_partial_packing_chunks_each_document_alone():
    rows = _rows(DOCS, PackingSpec("partial", 4))
    assert _column(rows, "input_ids") == [[10, 11, 12], [13, 14, 15, 16], [17, 18], [19, 20, 21, 22]]
    assert _column(rows, "id") == [0, 1, 1, 2]
    rows = _rows(DOCS, PackingSpec("partial", 5, overlap=1, bos_eos=(BOS, EOS)))
    assert _column(rows, "input_ids") == [
        [0, 10, 11, 12, 1], [0, 13, 14, 15, 1], [0, 15, 16, 17, 1], [0, 17, 18, 1], [0, 19, 20, 21, 1], [0, 21, 22, 1],
    ]


def test_truncate_keeps_the_head_and_eos_last():
    rows = _rows(DOCS, PackingSpec("truncate", 5, bos_eos=(BOS, EOS)))
    assert _column(rows, "input_ids") == [[0, 10, 11, 12, 1], [0, 13, 14, 15, 1], [0, 19, 20, 21, 1]]
    assert _column(_rows(DOCS, PackingSpec("truncate", 4)), "input_ids") == [[10, 11, 12], [13, 14, 15, 16], [19, 20, 21, 22]]


def test_no_packing_frames_each_example_with_bos_and_eos():
    rows = _rows(DOCS, PackingSpec("none", 4, bos_eos=(BOS, EOS)))
    assert _column(rows, "input_ids") == [[0, 10, 11, 12, 1], [0, 13, 14, 15, 16, 17, 18, 1], [0, 19, 20, 21, 22, 1]]
    assert _column(rows, "position_ids") == [list(range(5)), list(range(8)), list(range(6))]


def test_separator_masks_labels_through_the_prompt_across_chunks():
    # Prompts (through the separator) are 2, 4 and 0 tokens long.
    rows = _rows(DOCS, PackingSpec("full", 5, bos_eos=(BOS, EOS), ignore_index=IGNORE), prompt_lengths=[2, 4, 0])
    assert _column(rows, "input_ids") == [[0, 10, 11, 12, 1], [0, 13, 14, 15, 1], [0, 16, 17, 18, 1], [0, 19, 20, 21, 1], [0, 22, 1]]
    assert _column(rows, "labels") == [
        [0, IGNORE, IGNORE, 12, 1],
        [0, IGNORE, IGNORE, IGNORE, IGNORE],  # the row ends inside a prompt: EOS is not a target
        [0, IGNORE, 17, 18, 1],
        [0, 19, 20, 21, 1],
        [0, 22, 1],
    ]


def test_ignore_index_is_the_configured_value():
    rows = _rows([[5, 6, 7]], PackingSpec("none", 8, ignore_index=-1), prompt_lengths=[2])
    assert rows[0]["labels"] == [-1, -1, 7]


def test_collator_pads_right_and_ignores_padding_in_labels():
    batch = PadCollator(pad_id=7, ignore_index=-100)(
        [{"input_ids": np.array([1, 2, 3]), "labels": np.array([1, 2, 3]), "position_ids": np.array([0, 1, 2])},
         {"input_ids": np.array([4]), "labels": np.array([4]), "position_ids": np.array([0])}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert "position_ids" not in batch  # without document_mask the model numbers a row 0..n-1


def test_collator_with_document_mask_passes_positions_and_drops_cross_document_targets():
    batch = PadCollator(pad_id=7, ignore_index=-100, document_mask=True)(
        [{"input_ids": np.array([1, 2, 3, 4]), "labels": np.array([1, 2, 3, 4]), "position_ids": np.array([0, 1, 0, 1])}]
    )
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, -100, 4]]


# ---- properties --------------------------------------------------------------------------------

@st.composite
def packing_cases(draw):
    docs = draw(st.lists(st.lists(st.integers(2, 999), max_size=25), max_size=10))
    prompts = [draw(st.integers(0, len(d))) for d in docs]
    bos_eos = draw(st.booleans())
    max_seq_len = draw(st.integers(3, 12))
    content = max_seq_len - 2 if bos_eos else max_seq_len
    mode = draw(st.sampled_from(["full", "partial", "truncate", "none"]))
    overlap = draw(st.integers(0, content - 1)) if mode in ("full", "partial") else 0
    spec = PackingSpec(mode, max_seq_len, overlap, (BOS, EOS) if bos_eos else None, IGNORE)
    return docs, prompts, spec


def _content(row, spec, name="input_ids"):
    return row[name][1:-1] if spec.bos_eos else row[name]


def _expected_labels(docs, prompts):
    return [[IGNORE if i < p else t for i, t in enumerate(d)] for d, p in zip(docs, prompts)]


@settings(max_examples=300, deadline=None)
@given(packing_cases())
def test_packing_properties(case):
    docs, prompts, spec = case
    rows = _rows(docs, spec, prompts)
    stream = [t for d in docs for t in d]
    stream_labels = [t for d in _expected_labels(docs, prompts) for t in d]
    doc_starts = np.repeat(np.cumsum([0] + [len(d) for d in docs])[:-1], [len(d) for d in docs])

    for row in rows:
        if spec.mode != "none":
            assert len(row["input_ids"]) <= spec.max_seq_len
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        if spec.bos_eos:
            assert row["input_ids"][0] == BOS and row["input_ids"][-1] == EOS
            assert BOS not in _content(row, spec) and EOS not in _content(row, spec)
            assert row["labels"][-1] == (IGNORE if row["labels"][-2] == IGNORE else EOS)
        positions = row["position_ids"]
        assert positions[0] == 0
        assert all(b == a + 1 or b == 0 for a, b in zip(positions, positions[1:]))

    if spec.mode == "full":
        # Windows of the stream, `stride` apart, covering it exactly once without overlap.
        windows = [_content(r, spec) for r in rows]
        labels = [_content(r, spec, "labels") for r in rows]
        starts = [i * spec.stride for i in range(len(rows))]
        assert windows == [stream[s:s + spec.content] for s in starts]
        assert labels == [stream_labels[s:s + spec.content] for s in starts]
        assert not rows or starts[-1] + len(windows[-1]) == len(stream)
        if spec.overlap == 0:
            assert [t for w in windows for t in w] == stream
        for a, b in zip(windows, windows[1:]):
            assert a[len(a) - spec.overlap:] == b[:spec.overlap]
        # position_ids restart exactly at document starts (and at the row start).
        for start, row in zip(starts, rows):
            content_positions = _content(row, spec, "position_ids")
            index = np.arange(start, start + len(content_positions))
            expected = index - np.maximum(doc_starts[index], start) + (1 if spec.bos_eos else 0) * (doc_starts[index] <= start)
            assert content_positions == expected.tolist()
    else:
        # Per-document modes: each row is a window of one document, labels masked through its prompt.
        expected_labels = _expected_labels(docs, prompts)
        by_doc = {}
        for row in rows:
            by_doc.setdefault(row["id"], []).append(row)
        assert sorted(by_doc) == [i for i, d in enumerate(docs) if d]
        for i, doc_rows in by_doc.items():
            windows = [_content(r, spec) for r in doc_rows]
            starts = [k * spec.stride for k in range(len(doc_rows))]
            assert windows == [docs[i][s:s + (spec.content if spec.mode != "none" else len(docs[i]))] for s in starts]
            assert [_content(r, spec, "labels") for r in doc_rows] == [expected_labels[i][s:s + len(w)] for s, w in zip(starts, windows)]
            if spec.mode == "partial":
                assert starts[-1] + len(windows[-1]) == len(docs[i])
                for a, b in zip(windows, windows[1:]):
                    assert a[len(a) - spec.overlap:] == b[:spec.overlap]
            else:
                assert len(doc_rows) == 1


@settings(max_examples=150, deadline=None)
@given(packing_cases(), st.lists(st.integers(0, 10), max_size=4))
def test_rows_do_not_depend_on_batch_boundaries(case, cuts):
    """Streaming batches through one Packer gives the rows of packing everything at once."""
    docs, prompts, spec = case
    expected = _rows(docs, spec, prompts)
    bounds = sorted({0, len(docs), *[min(c, len(docs)) for c in cuts]})
    packer = Packer(spec)
    tables = [packer.add(Documents.from_lists(docs[a:b], prompts[a:b], ids=range(a, b))) for a, b in zip(bounds, bounds[1:])]
    tables.append(packer.finish())
    assert pa.concat_tables(tables).to_pylist() == expected
