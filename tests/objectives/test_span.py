"""Span corruption: exact lengths, exact reassembly, the noise density, sentinels laid out as HF's T5
tokenizers lay them out; the t5 tokenizer style that provides them."""

from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from scratchlm.errors import ScratchLMError
from scratchlm.models import build_config, build_model
from scratchlm.objectives import OBJECTIVES
from scratchlm.objectives.span import SpanConfig, SpanCorruption, noise_counts, random_partition, span_lengths
from scratchlm.tokenizer import TokenizerInfo, train_tokenizer

VOCAB = 400
SENTINELS = 100


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(None, tmp_path_factory.mktemp("t5") / "tok", family="t5", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def info(tokenizer_dir):
    return TokenizerInfo.load(tokenizer_dir)


@pytest.fixture(scope="module")
def span(info):
    return SpanCorruption(info)


def blocks_of(length: int, count: int, seed: int = 0, real: list[int] | None = None) -> list[dict[str, np.ndarray]]:
    """Random ordinary tokens (ids 3 .. V-101, never special, never a sentinel); block i keeps
    ``real[i]`` real tokens and pads the rest, as the packer's last block does."""
    rng = np.random.default_rng(seed)
    blocks = []
    for i in range(count):
        ids = rng.integers(3, VOCAB - SENTINELS, length)
        doc_ids = np.repeat(np.arange(4, dtype=np.int32), -(-length // 4))[:length]  # four documents
        n = length if real is None else real[i]
        ids[n:], doc_ids[n:] = 0, -1
        blocks.append({"input_ids": ids, "doc_ids": doc_ids})
    return blocks


def reassemble(encoder: list[int], target: list[int], sentinels: list[int], eos: int) -> list[int]:
    """The original tokens: each sentinel of the encoder input replaced by what follows the same
    sentinel in the target, up to the next sentinel or eos."""
    assert encoder[-1] == eos and target[-1] == eos
    spans, current = {}, None
    for token in target[:-1]:
        if token in sentinels:
            current = spans.setdefault(token, [])
            assert not current, "a sentinel appears twice in the target"
        else:
            current.append(token)
    out = []
    for token in encoder[:-1]:
        out.extend(spans.pop(token) if token in sentinels else [token])
    assert not spans, "a target span has no sentinel in the encoder input"
    return out


def real(row: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return row[mask].tolist()


# --- lengths ---------------------------------------------------------------------------------------


def test_lengths_are_the_t5_papers_for_its_setting():
    """T5 feeds 512 encoder tokens and 114 target tokens, cut from 568 raw tokens."""
    assert span_lengths(568, SpanConfig()) == (512, 114)
    assert noise_counts(568, SpanConfig()) == (85, 28)


@pytest.mark.parametrize("block_size", [8, 63, 64, 128, 257])
@pytest.mark.parametrize("density, mean", [(0.15, 3.0), (0.3, 1.0), (0.5, 8.0)])
def test_every_full_block_gives_exactly_s_encoder_and_t_target_tokens(info, block_size, density, mean):
    config = SpanConfig(noise_density=density, mean_span_length=mean)
    S, T = span_lengths(block_size, config)
    batch = SpanCorruption(info, config).collate(blocks_of(block_size, 6, seed=block_size))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (6, S)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == batch["decoder_attention_mask"].shape == (6, T)
    assert batch["attention_mask"].all() and batch["decoder_attention_mask"].all()  # nothing wasted on padding
    assert (batch["labels"] != -100).all()


def test_shorter_blocks_never_need_longer_sequences():
    config = SpanConfig()
    lengths = [span_lengths(n, config) for n in range(2, 600)]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(lengths, lengths[1:]))


# --- corruption ------------------------------------------------------------------------------------


@pytest.mark.parametrize("density, mean", [(0.15, 3.0), (0.3, 1.0), (0.5, 8.0)])
def test_inputs_and_targets_reassemble_exactly_into_the_original(span, info, density, mean):
    objective = SpanCorruption(info, SpanConfig(noise_density=density, mean_span_length=mean))
    blocks = blocks_of(96, 12, seed=3, real=[96] * 8 + [95, 40, 3, 2])
    batch = objective.collate(blocks)
    sentinels = objective.sentinels.tolist()
    for row, block in enumerate(blocks):
        encoder = real(batch["input_ids"][row], batch["attention_mask"][row])
        target = real(batch["labels"][row], batch["decoder_attention_mask"][row])
        original = block["input_ids"][block["doc_ids"] >= 0].tolist()
        assert reassemble(encoder, target, sentinels, info.eos_id) == original


def test_noise_density_is_met_within_a_token_per_span(span):
    blocks = blocks_of(128, 40, seed=5)
    batch = span.collate(blocks)
    sentinels = set(span.sentinels.tolist())
    for row in range(40):
        target = batch["labels"][row].tolist()[:-1]
        n_spans = sum(t in sentinels for t in target)
        hidden = len(target) - n_spans
        assert abs(hidden - 0.15 * 128) <= n_spans  # within a token per span (here: within half a token)
        assert n_spans == round(round(0.15 * 128) / 3.0)


def test_spans_are_random_with_the_configured_mean_length(span):
    batch = span.collate(blocks_of(512, 20, seed=6))
    sentinels = set(span.sentinels.tolist())
    lengths = []
    for row in batch["labels"].tolist():
        for token in row[:-1]:
            if token in sentinels:
                lengths.append(0)
            else:
                lengths[-1] += 1
    assert min(lengths) >= 1
    assert np.mean(lengths) == pytest.approx(3.0, abs=0.05)  # 77 hidden tokens in 26 spans per block
    assert len(set(lengths)) >= 5  # span lengths vary; they are not all 3


def test_random_partition_draws_every_split_alike():
    generator = torch.Generator().manual_seed(0)
    counts = Counter(tuple(random_partition(5, 2, generator)) for _ in range(4000))
    assert set(counts) == {(1, 4), (2, 3), (3, 2), (4, 1)}
    assert all(abs(c - 1000) < 120 for c in counts.values())


def test_sentinels_count_down_from_the_top_and_the_decoder_starts_with_pad(span, info):
    batch = span.collate(blocks_of(64, 2))
    assert span.sentinels[:3].tolist() == [VOCAB - 1, VOCAB - 2, VOCAB - 3] and len(span.sentinels) == SENTINELS
    for row in range(2):
        labels = batch["labels"][row]
        encoder_sentinels = [t for t in batch["input_ids"][row].tolist() if t >= VOCAB - SENTINELS]
        assert encoder_sentinels == list(range(VOCAB - 1, VOCAB - 1 - len(encoder_sentinels), -1))
        assert labels[0] == VOCAB - 1  # the target opens with <extra_id_0>
        assert batch["input_ids"][row, -1] == labels[-1] == info.eos_id
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    assert (batch["decoder_input_ids"][:, 0] == info.pad_id).all()


def test_padded_blocks_pad_both_sides_and_feed_the_decoder_pad(span, info):
    batch = span.collate(blocks_of(64, 2, real=[64, 20]))
    S20, T20 = span_lengths(20, SpanConfig())
    assert batch["attention_mask"][1].sum() == S20 and batch["decoder_attention_mask"][1].sum() == T20
    assert (batch["input_ids"][1, S20:] == info.pad_id).all() and (batch["labels"][1, T20:] == -100).all()
    assert (batch["decoder_input_ids"][1, T20 + 1 :] == info.pad_id).all()
    assert batch["decoder_input_ids"][1, T20] == info.eos_id  # last real target, shifted in


def test_validation_corruption_is_fixed_by_content_training_by_sample_seed(span):
    blocks = blocks_of(64, 4)
    first, again = span.eval_collate(blocks), span.eval_collate(blocks)
    assert all(torch.equal(first[k], again[k]) for k in first)
    seeded = [dict(b, sample_seed=np.array([0, 0, i], dtype=np.int64)) for i, b in enumerate(blocks)]
    reseeded = [dict(b, sample_seed=np.array([0, 0, i + 9], dtype=np.int64)) for i, b in enumerate(blocks)]
    assert torch.equal(span.collate(seeded)["labels"], span.collate(seeded)["labels"])
    assert not torch.equal(span.collate(seeded)["labels"], span.collate(reseeded)["labels"])


# --- loss ------------------------------------------------------------------------------------------


def test_loss_of_a_fresh_t5_is_near_uniform_and_trains(span):
    torch.manual_seed(0)
    model = build_model("t5", build_config("t5", "tiny", vocab_size=VOCAB, d_model=32, n_heads=2, d_ff=64))
    batch = span.collate(blocks_of(32, 2, real=[32, 20]))
    loss, _ = span.loss(model, batch)
    assert abs(loss.item() - np.log(VOCAB)) < 1.0
    loss.backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0 and model.encoder.position_bias.table.weight.grad.abs().sum() > 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(10):
        optimizer.zero_grad()
        loss_now, _ = span.loss(model, batch)
        loss_now.backward()
        optimizer.step()
    assert loss_now.item() < loss.item() - 1.0


def test_hf_t5_given_our_labels_computes_our_loss(span, info, tmp_path):
    """The batch means to HF what it means to us: ``T5ForConditionalGeneration`` fed only the
    encoder inputs and the labels (it shifts them right behind its decoder_start_token_id) gives
    the same loss as our objective on our model."""
    from transformers import AutoModelForSeq2SeqLM

    from scratchlm.export import export_hf

    torch.manual_seed(0)
    model = build_model("t5", build_config("t5", "tiny", vocab_size=VOCAB, d_model=32, n_heads=2, d_ff=64)).eval()
    special = {"pad": info.pad_id, "eos": info.eos_id, "unk": info.unk_id}
    folder = export_hf(model, "t5", tmp_path / "hf", tokenizer_files=None, special_ids=special, card={})
    hf = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    batch = span.eval_collate(blocks_of(64, 3, real=[64, 64, 21]))
    with torch.no_grad():
        ours, _ = span.loss(model, batch)
        theirs = hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            decoder_attention_mask=batch["decoder_attention_mask"], labels=batch["labels"],
        ).loss
    assert torch.equal(hf._shift_right(batch["labels"]), batch["decoder_input_ids"])
    assert abs(ours.item() - theirs.item()) < 1e-5


# --- configuration and errors ----------------------------------------------------------------------


def test_registered_as_span():
    assert OBJECTIVES["span"] is SpanCorruption and SpanCorruption.name == "span"


@pytest.mark.parametrize(
    "field, value, message",
    [("noise_density", 0.0, "noise_density=0.0"), ("noise_density", 1.0, "noise_density=1.0"),
     ("mean_span_length", 0.5, "mean_span_length=0.5")],
)
def test_bad_settings_are_named(field, value, message):
    with pytest.raises(ScratchLMError, match=f"model.span.{message}"):
        SpanConfig(**{field: value})


def small_tokenizer(tmp_path, sentinels: int) -> TokenizerInfo:
    """A t5 tokenizer trained on a few lines (instant, unlike the built-in corpus)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n\nspan corruption hides spans\n")
    return TokenizerInfo.load(
        train_tokenizer([str(corpus)], tmp_path / "tok", family="t5", vocab_size=60, sentinels=sentinels)
    )


def test_a_tokenizer_without_sentinels_is_refused(tmp_path):
    info = small_tokenizer(tmp_path, sentinels=0)
    with pytest.raises(ScratchLMError, match=r"no sentinel tokens \(<extra_id_0>.*--sentinels 100"):
        SpanCorruption(info)


def test_a_block_needing_more_spans_than_sentinels_is_refused(tmp_path):
    objective = SpanCorruption(small_tokenizer(tmp_path, sentinels=5))
    assert objective.sequence_lengths(100) == span_lengths(100, SpanConfig())  # 5 spans: fits
    with pytest.raises(ScratchLMError, match=r"data\.block_size=128 makes 6 masked spans.*only 5 sentinels"):
        objective.sequence_lengths(128)


# --- the t5 tokenizer style ------------------------------------------------------------------------


def test_t5_tokenizer_has_t5_special_ids_and_sentinels_at_the_top(info):
    assert (info.pad_id, info.eos_id, info.unk_id, info.bos_id, info.mask_id) == (0, 1, 2, None, None)
    assert info.vocab_size == VOCAB
    tokenizer = info.tokenizer()
    assert [tokenizer.token_to_id(f"<extra_id_{i}>") for i in (0, 1, 99)] == [VOCAB - 1, VOCAB - 2, VOCAB - 100]
    assert tokenizer.token_to_id("<extra_id_100>") is None


def test_t5_tokenizer_loads_in_transformers_and_keeps_sentinels_whole(tokenizer_dir):
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert hf.is_fast and len(hf) == VOCAB and hf.pad_token_id == 0 and hf.eos_token_id == 1
    ids = hf("for x in <extra_id_3> range").input_ids
    assert ids.count(VOCAB - 4) == 1 and ids[-1] == 1  # one sentinel token; closed by </s>
    tokens = hf.convert_ids_to_tokens(ids)
    assert "<extra_id_3>" in tokens and not any("extra" in t for t in tokens if t != "<extra_id_3>")
    assert hf.decode(ids, skip_special_tokens=True) == "for x in range"
