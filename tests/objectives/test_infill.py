"""BART text infilling and sentence permutation: span statistics, what survives corruption, the
decoder's inputs and targets, determinism, and the loss."""

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from scratchlm.data.packing import pack_documents
from scratchlm.errors import ScratchLMError
from scratchlm.models import build_config, build_model
from scratchlm.objectives import IGNORE_INDEX, OBJECTIVES, InfillConfig, TextInfilling
from scratchlm.objectives.infill import fit_spans, span_lengths
from scratchlm.tokenizer import TokenizerInfo, train_tokenizer

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
FULL_STOP, BANG, QUESTION, ABBREVIATION = 5, 6, 7, 8  # ".", "!", "?", "etc."
FIRST_WORD, VOCAB = 10, 500


def word_level_tokenizer() -> Tokenizer:
    """A real tokenizer whose token i decodes to a known text: specials, sentence ends, words."""
    vocab = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": UNK, "<mask>": MASK}
    vocab.update({".": FULL_STOP, "!": BANG, "?": QUESTION, "etc.": ABBREVIATION, "(.)x": 9})
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, VOCAB)})
    return Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))


def info(**overrides):
    fields = dict(
        path="tok", vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, bos_id=BOS, mask_id=MASK, cls_id=BOS,
        sep_id=EOS, unk_id=UNK, special_ids=(0, 1, 2, 3, 4), tokenizer=word_level_tokenizer,
    )
    return SimpleNamespace(**{**fields, **overrides})


def distinct_blocks(n: int, length: int, seed: int = 0, pad_tail: int = 0) -> list[dict]:
    """``<s> words </s>`` blocks whose words are all different, so every surviving token can be
    found in the original, and the spans between survivors measured."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.permutation(np.arange(FIRST_WORD, VOCAB))[:length]
        real = length - pad_tail
        ids[0], ids[real - 1] = BOS, EOS
        doc_ids = np.zeros(length, dtype=np.int32)
        ids[real:], doc_ids[real:] = PAD, -1
        out.append({"input_ids": ids.astype(np.int64), "doc_ids": doc_ids})
    return out


def spans_of(original: np.ndarray, corrupted: np.ndarray) -> list[int]:
    """Lengths of the spans each mask of ``corrupted`` stands for; asserts that the surviving
    tokens are the original's in order and that no two masks are adjacent."""
    where = {token: i for i, token in enumerate(original)}
    spans, previous, pending = [], -1, False
    for token in list(corrupted) + [None]:
        if token == MASK:
            assert not pending, "two masks in a row: spans must be separated by a kept token"
            pending = True
            continue
        position = len(original) if token is None else where[token]
        assert position > previous, "surviving tokens out of order"
        if pending:
            spans.append(position - previous - 1)
        else:
            assert position == previous + 1, "tokens vanished without a mask"
        previous, pending = position, False
    return spans


# --- text infilling ------------------------------------------------------------------------------


def test_infilling_masks_thirty_percent_in_poisson_spans():
    objective = TextInfilling(info(), InfillConfig(permute_sentences=False))
    blocks = distinct_blocks(120, 400)
    batch = objective.corrupt(blocks, np.random.default_rng(0))
    spans = []
    for row, block in enumerate(blocks):
        corrupted = batch["input_ids"][row][batch["attention_mask"][row]].numpy()
        assert corrupted[0] == BOS and corrupted[-1] == EOS, "special tokens were masked"
        row_spans = spans_of(block["input_ids"], corrupted)
        assert sum(row_spans) == round(0.3 * 398)  # exactly the rate, over the 398 ordinary tokens
        spans += row_spans
    spans = np.array(spans)
    # Every span draws from Poisson(3.5) except one cut short per block (to hit the count) and a few
    # insertions dropped for room: the histogram matches the Poisson law within sampling noise.
    assert abs(spans.mean() - 3.5) < 0.2
    for k in range(8):
        pmf = math.exp(-3.5) * 3.5**k / math.factorial(k)
        assert abs((spans == k).mean() - pmf) < 0.025, f"P(span = {k})"


def test_zero_length_spans_insert_a_mask():
    objective = TextInfilling(info(), InfillConfig(permute_sentences=False, mean_span=0.5))
    blocks = distinct_blocks(20, 200)
    batch = objective.corrupt(blocks, np.random.default_rng(1))
    spans = []
    for row, block in enumerate(blocks):
        corrupted = batch["input_ids"][row][batch["attention_mask"][row]].numpy()
        spans += spans_of(block["input_ids"], corrupted)
        assert len(corrupted) <= 200
    assert spans.count(0) > 50  # P(0) = 0.61 at λ = 0.5


def test_corrupted_text_never_outgrows_the_block():
    """Many zero-length spans, few tokens: insertions stop where the text would grow."""
    objective = TextInfilling(info(), InfillConfig(permute_sentences=False, mean_span=0.05, mask_ratio=0.5))
    blocks = distinct_blocks(200, 12, seed=3)
    batch = objective.corrupt(blocks, np.random.default_rng(2))
    for row, block in enumerate(blocks):
        corrupted = batch["input_ids"][row][batch["attention_mask"][row]].numpy()
        assert len(corrupted) <= 12
        assert sum(spans_of(block["input_ids"], corrupted)) == 5  # round(0.5 · 10)


def test_span_lengths_sum_exactly_and_fit_the_gaps():
    rng = np.random.default_rng(0)
    for total in (1, 2, 7, 40, 300):
        lengths = span_lengths(total, 3.5, rng)
        assert lengths.sum() == total and (lengths[:-1] >= 0).all() and lengths[-1] >= 1
    squeezed = fit_spans(np.array([0, 3, 0, 2, 1, 0]), 2)
    assert len(squeezed) == 2 and squeezed.sum() == 6 and (squeezed > 0).all()
    assert list(fit_spans(np.array([0, 3, 0]), 2)) == [3, 0]


def test_decoder_targets_are_the_original_shifted_behind_eos():
    objective = TextInfilling(info())
    blocks = distinct_blocks(4, 64, pad_tail=9)
    batch = objective.collate(blocks)
    original = torch.from_numpy(np.stack([b["input_ids"] for b in blocks]))
    real = torch.arange(64) < 55
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        k: (4, 64) for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels")
    }
    assert torch.equal(batch["labels"][:, real], original[:, real])
    assert (batch["labels"][:, ~real] == IGNORE_INDEX).all()
    assert (batch["decoder_input_ids"][:, 0] == EOS).all()  # BART's decoder start
    assert torch.equal(batch["decoder_input_ids"][:, 1:56], original[:, :55])
    assert (batch["decoder_input_ids"][:, 56:] == PAD).all()
    assert torch.equal(batch["decoder_attention_mask"], real.expand(4, 64))
    lengths = batch["attention_mask"].sum(1)
    assert (lengths < 55).all()  # 30% masked: shorter than the real text
    for row in range(4):
        assert torch.equal(batch["attention_mask"][row], torch.arange(64) < lengths[row])
        assert (batch["input_ids"][row, lengths[row] :] == PAD).all()


def test_eval_collate_is_fixed_by_content_and_collate_is_not():
    objective = TextInfilling(info())
    blocks = distinct_blocks(4, 64)
    first, again = objective.eval_collate(blocks), objective.eval_collate(blocks)
    assert all(torch.equal(first[k], again[k]) for k in first)
    torch.manual_seed(0)
    one = objective.collate(blocks)["input_ids"]
    torch.manual_seed(1)
    assert not torch.equal(one, objective.collate(blocks)["input_ids"])


def test_stream_seeds_fix_the_training_corruption():
    objective = TextInfilling(info())
    blocks = [dict(b, sample_seed=np.array([7, 0, i])) for i, b in enumerate(distinct_blocks(4, 64))]
    torch.manual_seed(0)
    one = objective.collate(blocks)
    torch.manual_seed(1)
    assert torch.equal(one["input_ids"], objective.collate(blocks)["input_ids"])


# --- sentence permutation ------------------------------------------------------------------------


def split_sentences(ids: list[int]) -> list[tuple[int, ...]]:
    out, current = [], []
    for token in ids:
        current.append(int(token))
        if token in (FULL_STOP, BANG, QUESTION, ABBREVIATION):
            out.append(tuple(current))
            current = []
    return out + [tuple(current)] if current else out


def is_reordering(shuffled: list[int], sentences: list[tuple[int, ...]]) -> bool:
    """Whether ``shuffled`` is the concatenation of ``sentences`` in some order."""
    if not sentences:
        return not shuffled
    for i, sentence in enumerate(sentences):
        if tuple(shuffled[: len(sentence)]) == sentence:
            if is_reordering(shuffled[len(sentence) :], sentences[:i] + sentences[i + 1 :]):
                return True
    return False


def two_documents(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """A block of two ``<s> sentences </s>`` documents, the second without a final stop."""
    texts = []
    for n_sentences, closed in ((6, True), (4, False)):
        text = []
        for i in range(n_sentences):
            text += list(rng.integers(FIRST_WORD, VOCAB, size=rng.integers(1, 6)))
            if closed or i < n_sentences - 1:
                text.append(int(rng.choice([FULL_STOP, BANG, QUESTION, ABBREVIATION])))
        texts.append(text)
    ids = [BOS, *texts[0], EOS, BOS, *texts[1], EOS]
    docs = [0] * (len(texts[0]) + 2) + [1] * (len(texts[1]) + 2)
    return np.array(ids), np.array(docs), texts


def test_sentence_permutation_keeps_every_sentence_inside_its_document():
    objective = TextInfilling(info())
    rng = np.random.default_rng(0)
    reordered = 0
    for _ in range(50):
        ids, docs, texts = two_documents(rng)
        out = objective.permute_sentences(ids, docs, rng)
        first = 1 + len(texts[0])
        assert out[0] == BOS and out[first] == EOS and out[first + 1] == BOS and out[-1] == EOS
        permuted = [list(out[1:first]), list(out[first + 2 : -1])]
        for text, shuffled in zip(texts, permuted):
            # The second document's last sentence has no stop: it moves as one sentence too.
            assert is_reordering([int(t) for t in shuffled], split_sentences(text))
        reordered += permuted != texts
    assert reordered > 40  # 6! and 4! orders: almost every draw changes something


def test_sentences_never_cross_a_document_boundary_without_special_tokens():
    """Blocks cut mid-document, or text without <s> and </s>: the document ids alone part the runs."""
    objective = TextInfilling(info())
    ids = np.array([11, FULL_STOP, 12, FULL_STOP, 13, FULL_STOP, 21, BANG, 22, BANG, 23, BANG])
    docs = np.array([0] * 6 + [1] * 6)
    outs = {tuple(objective.permute_sentences(ids, docs, np.random.default_rng(seed))) for seed in range(30)}
    assert len(outs) > 10
    for out in outs:
        assert set(out[:6]) == {11, 12, 13, FULL_STOP} and set(out[6:]) == {21, 22, 23, BANG}


def test_collate_permutes_then_masks():
    """Through the whole collate: the masks hide the set share of the ordinary tokens, and what
    survives is the original's tokens, with the document boundaries in place."""
    objective = TextInfilling(info(), InfillConfig(mask_ratio=0.1))
    rng = np.random.default_rng(1)
    blocks = []
    for _ in range(8):
        ids, docs, _ = two_documents(rng)
        blocks.append({
            "input_ids": np.pad(ids, (0, 64 - len(ids)), constant_values=PAD),
            "doc_ids": np.pad(docs, (0, 64 - len(ids)), constant_values=-1),
        })
    batch = objective.collate(blocks)
    reordered = 0
    for row, block in enumerate(blocks):
        original = block["input_ids"][block["doc_ids"] >= 0].tolist()
        corrupted = batch["input_ids"][row][batch["attention_mask"][row]].tolist()
        survivors = [t for t in corrupted if t != MASK]
        assert not Counter(survivors) - Counter(original), "a token appeared that was not in the text"
        assert len(original) - len(survivors) == round(0.1 * (len(original) - 4))
        assert [t for t in corrupted if t in (BOS, EOS)] == [BOS, EOS, BOS, EOS]
        kept = [t for t in original if t in survivors]
        reordered += survivors != kept
    assert reordered >= 6  # sentence order changed, beyond what masking alone explains


def test_sentence_ends_are_read_from_the_tokens_text():
    objective = TextInfilling(info())
    assert list(objective.sentence_end_ids) == [FULL_STOP, BANG, QUESTION, ABBREVIATION]


def test_byte_level_bpe_text_comes_back_in_the_labels(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Hello world. This is a test! Is it? Yes it is.\n\nAnother one here. With two sentences.\n")
    info_ = TokenizerInfo.load(train_tokenizer([str(corpus)], tmp_path / "tok", family="bart", vocab_size=300))
    assert (info_.bos_id, info_.pad_id, info_.eos_id, info_.unk_id, info_.mask_id) == (0, 1, 2, 3, 4)
    tokenizer = info_.tokenizer()
    objective = TextInfilling(info_)
    ends = {tokenizer.decode([i]).strip() for i in objective.sentence_end_ids}
    assert {".", "!", "?"} <= {e[-1] for e in ends}
    texts = ["Hello world. This is a test! Is it? Yes it is.", "Another one here. With two sentences."]
    documents = [tokenizer.encode(t).ids for t in texts]
    blocks = list(pack_documents(documents, sum(map(len, documents)) + 5, info_.pad_id))
    assert len(blocks) == 1
    batch = objective.collate(blocks)
    labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labels, skip_special_tokens=False) == "<s>" + texts[0] + "</s><s>" + texts[1] + "</s>"
    encoder_text = tokenizer.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False)
    assert "<mask>" in encoder_text


# --- errors and registry -------------------------------------------------------------------------


def test_a_tokenizer_without_a_mask_token_is_refused():
    with pytest.raises(ScratchLMError, match=r"tokenizer tok has no mask token.*--family bart"):
        TextInfilling(info(mask_id=None))


@pytest.mark.parametrize("field, value", [("mask_ratio", 0.0), ("mask_ratio", 1.0), ("mean_span", 0.0)])
def test_bad_settings_name_their_field(field, value):
    with pytest.raises(ScratchLMError, match=rf"model\.infill\.{field}="):
        InfillConfig(**{field: value})


def test_registered_under_its_name():
    assert OBJECTIVES["infill"] is TextInfilling and TextInfilling.name == "infill"
    assert TextInfilling.needs_word_starts is False


# --- loss ----------------------------------------------------------------------------------------


def test_loss_is_the_cross_entropy_of_real_targets_and_trains():
    torch.manual_seed(0)
    arch = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_positions=64, dropout=0.0)
    model = build_model("bart", build_config("bart", "tiny", vocab_size=VOCAB, **arch))
    objective = TextInfilling(info())
    batch = objective.eval_collate(distinct_blocks(4, 32, pad_tail=5))
    loss, _ = objective.loss(model, batch)
    logits = model.logits(model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]))
    real = batch["labels"] != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[real], batch["labels"][real])
    assert torch.allclose(loss, expected, atol=1e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        objective.loss(model, batch)[0].backward()
        optimizer.step()
    assert objective.loss(model, batch)[0] < 0.7 * loss
