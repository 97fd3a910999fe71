"""Fixtures of the comparison tests: one shared tokenizer with a mask token, trained once."""

import pytest
import torch

from scratchlm.tokenizer import train_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads on a busy two-core machine (see
    tests/export/conftest.py); the previous setting comes back after each module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def bert_style_tokenizer(tmp_path_factory) -> str:
    """A byte-level BPE with BERT-style specials ([CLS] [SEP] [MASK] [PAD]) on the built-in corpus,
    as ``scratchlm compare`` trains for its arms."""
    out = tmp_path_factory.mktemp("compare-tokenizer") / "tokenizer"
    return str(train_tokenizer(None, out, kind="bpe", vocab_size=600, family="modernbert"))


@pytest.fixture(scope="session")
def span_tokenizer(tmp_path_factory) -> str:
    """The shared tokenizer as a comparison with a span arm trains it: BERT-style specials plus
    sentinels <extra_id_0..7> at the top of the vocabulary, [SEP] as end of text."""
    out = tmp_path_factory.mktemp("compare-span-tokenizer") / "tokenizer"
    return str(train_tokenizer(None, out, kind="bpe", vocab_size=600, family="modernbert", sentinels=8))
