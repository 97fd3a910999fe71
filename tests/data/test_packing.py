"""Packing loses, duplicates and reorders nothing, and numbers documents within each block."""

import numpy as np
import pytest

from scratchlm.data.packing import Packer, pack_documents

PAD = -7


def random_documents(rng: np.random.Generator, n: int, longest: int) -> list[list[int]]:
    """Documents of 1..longest tokens; token values are unique across the corpus."""
    lengths = rng.integers(1, longest + 1, size=n)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [list(range(100 + a, 100 + b)) for a, b in zip(starts[:-1], starts[1:])]


def expected_doc_ids(documents: list[list[int]], block_size: int) -> np.ndarray:
    """doc_ids computed another way: global document index minus that of the block's first token."""
    global_doc = np.concatenate([np.full(len(d), i) for i, d in enumerate(documents)])
    first_of_block = global_doc[(np.arange(len(global_doc)) // block_size) * block_size]
    return global_doc - first_of_block


@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
def test_every_token_once_in_order_with_doc_ids_and_padding_only_at_the_end(block_size):
    documents = random_documents(np.random.default_rng(block_size), n=40, longest=3 * block_size + 2)
    blocks = list(pack_documents(documents, block_size, PAD))

    ids = np.concatenate([b["input_ids"] for b in blocks])
    doc_ids = np.concatenate([b["doc_ids"] for b in blocks])
    total = sum(map(len, documents))
    assert all(b["input_ids"].shape == (block_size,) and b["input_ids"].dtype == np.int64 for b in blocks)
    assert all(b["doc_ids"].dtype == np.int32 for b in blocks)
    assert len(blocks) == -(-total // block_size)
    assert ids[:total].tolist() == [t for d in documents for t in d]
    assert doc_ids[:total].tolist() == expected_doc_ids(documents, block_size).tolist()
    assert (ids[total:] == PAD).all() and (doc_ids[total:] == -1).all()
    assert (doc_ids[:total] >= 0).all()


def test_a_document_longer_than_a_block_spans_blocks_and_restarts_numbering():
    blocks = list(pack_documents([[1, 2], list(range(10, 21)), [5]], block_size=4, pad_id=0))
    assert [b["input_ids"].tolist() for b in blocks] == [
        [1, 2, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19], [20, 5, 0, 0]
    ]
    assert [b["doc_ids"].tolist() for b in blocks] == [
        [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, -1, -1]
    ]


def test_exact_fit_leaves_no_padded_block_and_pad_last_false_drops_the_partial_one():
    assert len(list(pack_documents([[1, 2], [3, 4]], block_size=2, pad_id=0))) == 2
    assert [b["input_ids"].tolist() for b in pack_documents([[1, 2, 3]], 2, 0, pad_last=False)] == [[1, 2]]


def test_the_partial_block_carries_over_to_the_next_documents():
    packer = Packer(block_size=4, pad_id=0)
    assert list(packer.add([1, 2, 3])) == []  # end of an "epoch": nothing emitted, nothing lost
    (block,) = packer.add([4, 5])
    assert block["input_ids"].tolist() == [1, 2, 3, 4] and block["doc_ids"].tolist() == [0, 0, 0, 1]
    last = packer.flush()
    assert last["input_ids"].tolist() == [5, 0, 0, 0] and last["doc_ids"].tolist() == [0, -1, -1, -1]
    assert packer.flush() is None


def test_empty_documents_take_no_doc_id_and_emitted_blocks_are_not_reused():
    packer = Packer(block_size=3, pad_id=0)
    (first,) = packer.add([1, 2, 3])
    list(packer.add([]))
    (second,) = packer.add([4, 5, 6])
    assert first["input_ids"].tolist() == [1, 2, 3] and second["input_ids"].tolist() == [4, 5, 6]
    assert second["doc_ids"].tolist() == [0, 0, 0]
