"""Held-out scoring: batched pseudo-log-likelihood (MLM and span corruption) and next-token
likelihood against slow, one-sequence-at-a-time references, on the same tokens and bytes for
every arm."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratchlm.compare.config import DataSpec, EvalSpec
from scratchlm.compare.evaluate import (
    HeldOut,
    causal_nll,
    evaluate_arm,
    load_held_out,
    masked_accuracy,
    pseudo_nll,
    span_accuracy,
    span_pseudo_nll,
    windows,
)
from scratchlm.data import iter_documents, resolve_sources
from scratchlm.models import build_config, build_model
from scratchlm.objectives import SpanConfig, SpanCorruption
from scratchlm.objectives.span import replace_runs
from scratchlm.tokenizer import TokenizerInfo

WINDOW = 16


@pytest.fixture(scope="module")
def info(bert_style_tokenizer) -> TokenizerInfo:
    return TokenizerInfo.load(bert_style_tokenizer)


@pytest.fixture(scope="module")
def held_out(info) -> HeldOut:
    """Three held-out documents of the built-in corpus, cut to ~40 tokens: several windows each."""
    data = DataSpec(block_size=WINDOW, val_fraction=0.1)
    return load_held_out(data, info, EvalSpec(documents=3, doc_tokens=40))


def twin_models(vocab_size: int):
    """An untrained encoder and its causal twin with a local window shorter than the eval window,
    so that local attention, padding and the window all matter."""
    torch.manual_seed(0)
    config = build_config("modernbert", "tiny", vocab_size=vocab_size, n_layers=2, d_model=32, n_heads=2, d_ff=48, local_window=8)
    encoder = build_model("modernbert", config).eval()
    decoder = build_model("modernbert-causal", config).eval()
    return encoder, decoder


def test_windows_score_every_position_after_the_first_exactly_once():
    for length in (1, 2, 5, 16, 17, 31, 46):
        spans = windows(length, WINDOW)
        targets = [p for start, end in spans for p in range(start + 1, end)]
        assert sorted(targets) == list(range(1, length)), length
        assert all(end - start <= WINDOW for start, end in spans)
        # Each window after the first starts on the previous window's last token: its context.
        assert all(b[0] == a[1] - 1 for a, b in zip(spans, spans[1:]))


def test_held_out_is_exactly_the_start_of_held_out_documents(held_out, info):
    held_out_texts = {d.text for d in iter_documents(resolve_sources(None))}
    assert len(held_out.texts) == 3
    for text, ids in zip(held_out.texts, held_out.ids):
        assert any(doc.startswith(text) for doc in held_out_texts)
        assert info.tokenizer().encode(text).ids == ids  # the scored tokens are those of the scored text
        assert len(ids) > WINDOW  # several windows per document
    assert held_out.n_bytes == sum(len(t.encode("utf-8")) for t in held_out.texts)
    # [CLS] and [SEP] are not scored; everything else is.
    assert held_out.n_tokens == sum(len(ids) - 2 for ids in held_out.ids)


def reference_pseudo_nll(model, held_out: HeldOut, mask_id: int) -> float:
    """One forward pass per scored token, on its own unpadded window."""
    total = 0.0
    for ids, scored in zip(held_out.ids, held_out.scored):
        for start, end in windows(len(ids), held_out.window):
            for p in range(start + 1, end):
                if not scored[p]:
                    continue
                x = torch.tensor([ids[start:end]])
                x[0, p - start] = mask_id
                log_probs = F.log_softmax(model.logits(model(x))[0, p - start], dim=-1)
                total -= log_probs[ids[p]].item()
    return total


def reference_causal_nll(model, held_out: HeldOut) -> float:
    """One forward pass per scored token, on exactly the window's tokens before it."""
    total = 0.0
    for ids, scored in zip(held_out.ids, held_out.scored):
        for start, end in windows(len(ids), held_out.window):
            for p in range(start + 1, end):
                if scored[p]:
                    prefix = torch.tensor([ids[start:p]])
                    log_probs = F.log_softmax(model.logits(model(prefix))[0, -1], dim=-1)
                    total -= log_probs[ids[p]].item()
    return total


@torch.no_grad()
def test_batched_pseudo_log_likelihood_matches_the_slow_reference(held_out, info):
    encoder, _ = twin_models(info.vocab_size)
    # A batch size that splits windows across batches and leaves a ragged last batch.
    fast = pseudo_nll(encoder, held_out, info.pad_id, info.mask_id, batch_size=7)
    slow = reference_pseudo_nll(encoder, held_out, info.mask_id)
    assert fast == pytest.approx(slow, rel=1e-5)


@torch.no_grad()
def test_batched_next_token_likelihood_matches_the_slow_reference(held_out, info):
    _, decoder = twin_models(info.vocab_size)
    fast = causal_nll(decoder, held_out, info.pad_id, batch_size=2)
    slow = reference_causal_nll(decoder, held_out)
    assert fast == pytest.approx(slow, rel=1e-5)


def test_both_arms_score_the_same_bytes_and_tokens_with_finite_bits_per_byte(held_out, info):
    encoder, decoder = twin_models(info.vocab_size)
    spec = EvalSpec(batch_size=32)
    mlm = evaluate_arm(encoder, "mlm", held_out, info, spec)
    clm = evaluate_arm(decoder, "clm", held_out, info, spec)
    assert mlm["eval_bytes"] == clm["eval_bytes"] == held_out.n_bytes
    assert mlm["eval_tokens"] == clm["eval_tokens"] == held_out.n_tokens
    for metrics in (mlm, clm):
        assert math.isfinite(metrics["bits_per_byte"]) and metrics["bits_per_byte"] > 0
        # nats per token -> bits per byte is one fixed conversion, the same for both arms.
        expected = metrics["nll_per_token"] * held_out.n_tokens / (math.log(2) * held_out.n_bytes)
        assert metrics["bits_per_byte"] == pytest.approx(expected)
    # An untrained model is close to a uniform guess: ln V nats per token.
    assert clm["perplexity"] == pytest.approx(info.vocab_size, rel=0.3)
    assert "mlm_accuracy" in mlm and "perplexity" not in mlm and "mlm_accuracy" not in clm


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """The number of targets of every ``F.cross_entropy`` call that ``compare.evaluate`` makes."""
    sizes = []
    original = F.cross_entropy

    def counting(logits, targets, **kwargs):
        sizes.append(targets.numel())
        return original(logits, targets, **kwargs)

    monkeypatch.setattr("scratchlm.compare.evaluate.F.cross_entropy", counting)
    return sizes


def test_mlm_accuracy_masks_fifteen_percent_deterministically(held_out, info, counted):
    encoder, _ = twin_models(info.vocab_size)
    spec = EvalSpec(mask_rate=0.15, batch_size=4)
    first = masked_accuracy(encoder, held_out, info, spec)
    masked = sum(counted)
    assert masked_accuracy(encoder, held_out, info, spec) == first  # the same masks every time
    assert 0.07 * held_out.n_tokens < masked < 0.25 * held_out.n_tokens  # ~15% of the scored tokens


# --- span corruption ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def span_info(span_tokenizer) -> TokenizerInfo:
    return TokenizerInfo.load(span_tokenizer)


@pytest.fixture(scope="module")
def span_held_out(span_info) -> HeldOut:
    return load_held_out(DataSpec(block_size=WINDOW, val_fraction=0.1), span_info, EvalSpec(documents=3, doc_tokens=40))


def untrained_t5(vocab_size: int):
    torch.manual_seed(0)
    config = build_config("t5", "tiny", vocab_size=vocab_size, n_layers=2, n_decoder_layers=2, d_model=32, n_heads=2, d_ff=48)
    return build_model("t5", config).eval()


def reference_span_pseudo_nll(model, held_out: HeldOut, objective: SpanCorruption, scored_offset: int = 0) -> float:
    """One forward pass per scored token, on its own unpadded window, laid out by span
    corruption's own code (``replace_runs``) as a block whose only hidden span is that token: the
    encoder reads the window with the token replaced by sentinel 0, then eos; the decoder reads
    the start token and the target ``<extra_id_0> token <extra_id_1> </s>`` shifted right, and
    the token is scored where the target holds it. ``scored_offset`` scores another window
    token instead: a broken scorer, which the comparison must catch."""
    total = 0.0
    for ids, scored in zip(held_out.ids, held_out.scored):
        for start, end in windows(len(ids), held_out.window):
            window = np.array(ids[start:end])
            for p in range(start + 1, end):
                if not scored[p]:
                    continue
                runs = np.zeros(len(window), dtype=np.int64)
                runs[p - start] = 1  # kept run 0, hidden span 0 (run 1), kept run 2
                runs[p - start + 1 :] = 2
                encoder = replace_runs(window, runs, 1, objective.sentinels, objective.eos_id)
                target = replace_runs(window, runs, 0, objective.sentinels, objective.eos_id)
                assert target[0] == objective.sentinels[0] and target[1] == ids[p]
                decoder = np.concatenate([[objective.start_id], target[:-1]])
                hidden = model(torch.tensor(encoder)[None], None, torch.tensor(decoder)[None])
                log_probs = F.log_softmax(model.logits(hidden)[0, 1], dim=-1)
                total -= log_probs[ids[min(p + scored_offset, end - 1)]].item()
    return total


@torch.no_grad()
def test_batched_span_pseudo_log_likelihood_matches_the_slow_reference(span_held_out, span_info):
    model = untrained_t5(span_info.vocab_size)
    objective = SpanCorruption(span_info, SpanConfig())
    # A batch size that splits windows across batches and pads the short last windows.
    fast = span_pseudo_nll(model, span_held_out, objective, batch_size=7)
    slow = reference_span_pseudo_nll(model, span_held_out, objective)
    assert fast == pytest.approx(slow, rel=1e-5)
    assert fast != pytest.approx(reference_span_pseudo_nll(model, span_held_out, objective, scored_offset=1), rel=1e-3)


def test_a_span_arm_scores_every_byte_once_with_finite_bits_per_byte(span_held_out, span_info):
    model = untrained_t5(span_info.vocab_size)
    metrics = evaluate_arm(model, "span", span_held_out, span_info, EvalSpec(batch_size=32), span=SpanConfig())
    assert metrics["eval_bytes"] == span_held_out.n_bytes
    assert metrics["eval_tokens"] == span_held_out.n_tokens
    assert math.isfinite(metrics["bits_per_byte"]) and metrics["bits_per_byte"] > 0
    expected = metrics["nll_per_token"] * span_held_out.n_tokens / (math.log(2) * span_held_out.n_bytes)
    assert metrics["bits_per_byte"] == pytest.approx(expected)
    assert span_info.vocab_size / 2 < metrics["pseudo_perplexity"] < 2 * span_info.vocab_size  # untrained: near uniform
    assert 0 <= metrics["span_accuracy"] <= 1 and math.isfinite(metrics["span_loss"])
    assert "perplexity" not in metrics and "mlm_accuracy" not in metrics


@torch.no_grad()
def test_span_accuracy_corrupts_at_the_training_density_deterministically(span_held_out, span_info, counted):
    model = untrained_t5(span_info.vocab_size)
    dense = SpanCorruption(span_info, SpanConfig(noise_density=0.3))
    sparse = SpanCorruption(span_info, SpanConfig(noise_density=0.15))
    first = span_accuracy(model, span_held_out, dense, batch_size=4)
    dense_targets = sum(counted)
    assert span_accuracy(model, span_held_out, dense, batch_size=4) == first  # the same spans every time
    counted.clear()
    span_accuracy(model, span_held_out, sparse, batch_size=4)
    assert sum(counted) < dense_targets  # fewer hidden tokens, a shorter target
