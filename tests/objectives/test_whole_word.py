"""Whole-word masking and fixed mask counts, through the real tokenizer and data stream."""

import numpy as np
import pytest
import torch

from scratchlm.data import PackedBlocks, resolve_sources
from scratchlm.objectives import IGNORE_INDEX, MaskedLM, MaskingConfig
from scratchlm.tokenizer import TokenizerInfo, train_tokenizer

TEXT = (
    "Tokenization splits uncommonly long words into several pieces, while frequent words stay whole. "
    "Interoperability, internationalization and characterization are long words; so are "
    "misunderstanding, overgeneralization and counterintuitively. "
)


@pytest.fixture(scope="module")
def bpe_blocks(tmp_path_factory):
    """Byte-level BPE with a small vocabulary (long words split into many pieces) on BERT's special
    tokens, and blocks carrying word starts."""
    folder = tmp_path_factory.mktemp("wwm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT * (i % 3 + 1) for i in range(40)))
    tokenizer = train_tokenizer([str(corpus)], folder / "tok", kind="bpe", vocab_size=320, family="bert")
    stream = PackedBlocks(resolve_sources([str(corpus)]), str(tokenizer), 64, split="all", shuffle_buffer=0, word_starts=True)
    return TokenizerInfo.load(tokenizer), list(stream)


def words_of(starts_T: torch.Tensor) -> list[slice]:
    positions = starts_T.nonzero().flatten().tolist() + [len(starts_T)]
    return [slice(a, b) for a, b in zip(positions, positions[1:])]


def test_word_starts_follow_the_tokenizers_words(bpe_blocks):
    info, blocks = bpe_blocks
    tokenizer = info.tokenizer()
    starts = blocks[0]["word_starts"]
    ids = blocks[0]["input_ids"]
    pieces_per_word = np.diff(np.append(np.flatnonzero(starts), len(starts)))
    assert pieces_per_word.max() >= 3, "the test needs words of several pieces"
    # Decoding one word's pieces gives one word: no inner spaces, at most a leading one.
    for word in words_of(torch.from_numpy(starts))[1:10]:
        text = tokenizer.decode(ids[word].tolist(), skip_special_tokens=False)
        assert " " not in text.strip(), text


@pytest.mark.parametrize("fixed_count", [False, True])
def test_whole_word_masking_never_splits_a_word(bpe_blocks, fixed_count):
    info, blocks = bpe_blocks
    torch.manual_seed(0)
    mlm = MaskedLM(info, MaskingConfig(mask_rate=0.3, whole_word=True, fixed_count=fixed_count))
    batch = mlm.collate(blocks)
    chosen_BT = batch["labels"] != IGNORE_INDEX
    original_BT = torch.where(chosen_BT, batch["labels"], batch["input_ids"])  # undo the corruption
    eligible_BT = batch["attention_mask"] & ~torch.isin(original_BT, mlm.special_ids)
    multi_piece_words_masked = words_chosen = words_eligible = 0
    for row in range(chosen_BT.shape[0]):
        for word in words_of(batch["word_starts"][row]):
            states = chosen_BT[row, word]
            assert states.all() or not states.any(), f"word half-masked in row {row} at {word}"
            multi_piece_words_masked += int(states.all() and len(states) > 1)
            words_chosen += int(states.all())
            words_eligible += int(eligible_BT[row, word].all())
        if fixed_count:
            assert chosen_BT[row].sum() <= mlm.count(chosen_BT.shape[1])
    assert multi_piece_words_masked > 5
    # The rate applies to words; the share of tokens follows it only on average over word lengths.
    assert 0.25 < words_chosen / words_eligible < 0.35


def test_fixed_count_chooses_exactly_k_tokens_and_the_head_sees_a_static_shape(bpe_blocks):
    info, blocks = bpe_blocks
    torch.manual_seed(0)
    mlm = MaskedLM(info, MaskingConfig(mask_rate=0.15, fixed_count=True))
    batch = mlm.collate(blocks)
    k = mlm.count(64)
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) == k).all()

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(info.vocab_size, 8)
            self.head = torch.nn.Linear(8, info.vocab_size)

        def forward(self, input_ids, attention_mask=None, *, doc_ids=None):
            return self.embed(input_ids)

        def logits(self, hidden):
            self.rows = hidden.shape[0]
            return self.head(hidden)

    model = Recorder()
    loss, _ = mlm.loss(model, batch)
    assert model.rows == len(blocks) * k and torch.isfinite(loss)
