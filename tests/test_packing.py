"""Golden tests of full packing on hand-written token streams."""

import numpy as np

from launcher.data import PadCollator, pack_full


def _rows(dataset):
    return [dict(row) for row in dataset]


def test_full_packing_with_bos_eos_frames_every_chunk():
    tokens = np.arange(10, 23)
    offsets = np.array([0, 3, 9, 13])  # documents of 3, 6, 4 tokens
    rows = _rows(pack_full(tokens, offsets, max_seq_len=6, bos_eos=(0, 1)))
    assert [r["input_ids"] for r in rows] == [
        [0, 10, 11, 12, 13, 1], [0, 14, 15, 16, 17, 1], [0, 18, 19, 20, 21, 1], [0, 22, 1],
    ]
    assert [r["position_ids"] for r in rows] == [
        [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3], [0, 1, 2],
    ]
    assert all(r["labels"] == r["input_ids"] for r in rows)


def test_full_packing_without_special_tokens_loses_nothing():
    tokens = np.arange(100, 113)
    offsets = np.array([0, 3, 9, 13])
    rows = _rows(pack_full(tokens, offsets, max_seq_len=5))
    assert [t for r in rows for t in r["input_ids"]] == list(range(100, 113))
    assert [len(r["input_ids"]) for r in rows] == [5, 5, 3]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0], [0, 1, 2]]


def test_collator_pads_right_and_ignores_padding_in_labels():
    batch = PadCollator(pad_id=7, ignore_index=-100)(
        [{"input_ids": np.array([1, 2, 3]), "labels": np.array([1, 2, 3]), "position_ids": np.array([0, 1, 2])},
         {"input_ids": np.array([4]), "labels": np.array([4]), "position_ids": np.array([0])}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
