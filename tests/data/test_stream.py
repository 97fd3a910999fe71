"""The packed stream: sharded over ranks and real DataLoader workers without loss or overlap, a
stable validation split, and a shuffle that is reproducible yet new each epoch."""

from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from numbered_corpus import BLOCK, identities, write_corpus
from scratchlm.data.sources import resolve_sources
from scratchlm.data.stream import PackedBlocks, validation_score
from scratchlm.tokenizer import TokenizerInfo, train_tokenizer


def stream(corpus, tokenizer, **options) -> PackedBlocks:
    options = {"split": "all", "epochs": 1, "block_size": BLOCK, **options}
    return PackedBlocks(resolve_sources([str(corpus)]), tokenizer, options.pop("block_size"), **options)


def vocab_of(tokenizer: str) -> dict[int, str]:
    return {i: t for t, i in TokenizerInfo.load(tokenizer).tokenizer().get_vocab().items()}


def seen(blocks, vocab) -> list[int]:
    return [k for block in blocks for k in identities(block["input_ids"], vocab)]


def test_ranks_times_workers_read_every_document_exactly_once(numbered):
    corpus, texts, tokenizer = numbered
    vocab = vocab_of(tokenizer)
    per_rank = []
    for rank in range(2):
        loader = DataLoader(stream(corpus, tokenizer, rank=rank, world_size=2), batch_size=4, num_workers=2)
        batches = list(loader)
        assert all(b["input_ids"].shape[1] == BLOCK for b in batches)
        per_rank.append(seen(batches, vocab))
    assert all(per_rank), "each rank gets a share"
    assert sorted(per_rank[0] + per_rank[1]) == list(range(len(texts)))


def test_documents_split_across_blocks_and_shards_keep_every_token(numbered, tmp_path):
    """Documents of varied lengths (many straddle blocks): across 2 ranks x 2 workers, the non-pad
    tokens are exactly the corpus's tokens, each document closed by one end-of-text."""
    _, _, tokenizer = numbered
    corpus = tmp_path / "varied.jsonl"
    texts = write_corpus(corpus, 37, lambda k: (7 * k) % 23)
    info = TokenizerInfo.load(tokenizer)
    raw = info.tokenizer()
    expected = Counter(t for text in texts for t in raw.encode(text).ids + [info.eos_id])
    got = Counter()
    for rank in range(2):
        blocks = stream(corpus, tokenizer, rank=rank, world_size=2, block_size=7)
        loader = DataLoader(blocks, batch_size=None, num_workers=2)
        for block in loader:
            got.update(block["input_ids"][block["doc_ids"] >= 0].tolist())
            assert (block["input_ids"][block["doc_ids"] < 0] == info.pad_id).all()
    assert got == expected


def test_a_single_unshuffled_stream_is_the_corpus_in_order(numbered, tmp_path):
    _, _, tokenizer = numbered
    corpus = tmp_path / "varied.jsonl"
    texts = write_corpus(corpus, 20, lambda k: k % 9)
    info = TokenizerInfo.load(tokenizer)
    blocks = list(stream(corpus, tokenizer, block_size=5, shuffle_buffer=0))
    ids = np.concatenate([b["input_ids"] for b in blocks])
    doc_ids = np.concatenate([b["doc_ids"] for b in blocks])
    raw = info.tokenizer()
    assert ids[doc_ids >= 0].tolist() == [t for text in texts for t in raw.encode(text).ids + [info.eos_id]]
    assert (np.diff((doc_ids < 0).astype(int)) >= 0).all(), "padding only at the end"


def test_validation_and_training_splits_are_disjoint_cover_everything_and_follow_the_hash(numbered):
    corpus, texts, tokenizer = numbered
    vocab = vocab_of(tokenizer)
    train = seen(stream(corpus, tokenizer, split="train", val_fraction=0.3), vocab)
    val = seen(stream(corpus, tokenizer, split="val", val_fraction=0.3, shuffle_buffer=64), vocab)
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == list(range(len(texts)))
    assert val == sorted(val), "validation is never shuffled"
    assert set(val) == {k for k, text in enumerate(texts) if validation_score(text) < 0.3}
    assert 0 <= min(map(validation_score, texts)) and max(map(validation_score, texts)) < 1


def test_same_seed_same_blocks_and_each_epoch_a_new_order(numbered):
    corpus, texts, tokenizer = numbered
    vocab = vocab_of(tokenizer)
    first = list(stream(corpus, tokenizer, epochs=2, seed=3))
    again = list(stream(corpus, tokenizer, epochs=2, seed=3))
    other = list(stream(corpus, tokenizer, epochs=2, seed=4))
    assert len(first) == len(again) == 2 * len(texts)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(first, again))
    epoch0, epoch1 = seen(first[: len(texts)], vocab), seen(first[len(texts) :], vocab)
    assert sorted(epoch0) == sorted(epoch1) == list(range(len(texts)))
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)
    assert seen(other, vocab) != epoch0 + epoch1


def test_an_endless_stream_repeats_the_corpus(numbered):
    corpus, texts, tokenizer = numbered
    endless = iter(stream(corpus, tokenizer, epochs=None))
    blocks = [next(endless) for _ in range(3 * len(texts) + 5)]
    counts = Counter(seen(blocks, vocab_of(tokenizer)))
    assert set(counts) == set(range(len(texts))) and min(counts.values()) >= 3


def test_bert_style_documents_are_wrapped_in_cls_sep_with_no_extra_separator(tmp_path):
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, 5, lambda k: 3)
    tokenizer = train_tokenizer(
        [str(corpus)], tmp_path / "tok", kind="wordpiece", family="bert", vocab_size=200, min_frequency=1
    )
    info = TokenizerInfo.load(tokenizer)
    (block,) = stream(corpus, tokenizer, block_size=64, shuffle_buffer=0)
    ids, doc_ids = block["input_ids"], block["doc_ids"]
    for d in range(5):
        doc = ids[doc_ids == d]
        assert doc[0] == info.cls_id and doc[-1] == info.sep_id and len(doc) == 1 + 4 + 3 + 1
    assert (ids[doc_ids < 0] == info.pad_id).all()


def test_a_bad_line_in_a_worker_surfaces_as_the_users_error(numbered, tmp_path):
    _, _, tokenizer = numbered
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "doc zero zero one"}\n{"text": 5}\n')
    from scratchlm.errors import ScratchLMError

    with pytest.raises(ScratchLMError, match=r"bad\.jsonl:2"):
        list(DataLoader(stream(corpus, tokenizer), batch_size=None, num_workers=1))
