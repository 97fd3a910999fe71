"""T5 specifics and the encoder-decoder contract (``models/seq2seq.py``) on T5."""

import pytest
import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.models import FAMILIES, T5Config, build_config, build_model
from scratchlm.models.seq2seq import greedy_decode, is_encoder_decoder
from scratchlm.models.t5 import relative_buckets

VOCAB = 300
SMALL = dict(d_model=64, n_heads=4, d_ff=96)


def tiny(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model("t5", build_config("t5", "tiny", vocab_size=VOCAB, **{**SMALL, **overrides})).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny()


# --- config and registry -------------------------------------------------------------------------


def test_registry_and_presets():
    spec = FAMILIES["t5"]
    assert (spec.objective, spec.causal, spec.encoder_decoder) == ("span", False, True)
    sizes = {
        size: (c.d_model, c.n_layers, c.n_decoder_layers, c.n_heads, c.head_dim, c.d_ff)
        for size in ("tiny", "small", "base")
        for c in [build_config("t5", size, vocab_size=100)]
    }
    assert sizes == {
        "tiny": (128, 2, 2, 4, 32, 320),
        "small": (512, 8, 8, 8, 64, 1024),
        "base": (768, 12, 12, 12, 64, 2048),
    }


@pytest.mark.parametrize("size, total", [("small", 83_252_736), ("base", 247_577_856)])
def test_presets_have_the_documented_parameter_counts(size, total):
    with torch.device("meta"):
        model = build_model("t5", build_config("t5", size, vocab_size=32128))
    assert model.num_params() == total


def test_base_preset_has_the_parameter_count_of_t5_v1_1_base():
    """HF's count for google/t5-v1_1-base's config (d_kv 64, gated-gelu, untied head), computed
    from the stock class on the meta device."""
    import transformers

    hf_config = transformers.T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(hf_config)
        ours = build_model("t5", build_config("t5", "base", vocab_size=32128))
    # The tensors of a v1.1 checkpoint: the shared embedding once (the stacks' embed_tokens are
    # aliases of it) and lm_head on its own (transformers 5 ties it at construction and unties it
    # on loading a file that holds both).
    named = hf.named_parameters(remove_duplicate=False)
    hf_count = sum(p.numel() for name, p in named if not name.endswith("embed_tokens.weight"))
    assert ours.num_params() == hf_count


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_decoder_layers=0), r"model\.arch\.n_decoder_layers=0: must be a positive integer"),
        (dict(num_buckets=2), r"model\.arch\.num_buckets=2"),
        (dict(max_distance=4, num_buckets=32), r"model\.arch\.max_distance=4 must exceed"),
        (dict(d_model=66), r"model\.arch\.d_model=66 is not divisible"),
    ],
)
def test_bad_fields_are_named(overrides, message):
    with pytest.raises(ScratchLMError, match=message):
        T5Config(vocab_size=100, **{**SMALL, **overrides})


# --- relative positions --------------------------------------------------------------------------


def test_relative_buckets_exact_near_logarithmic_far_and_directional():
    bidirectional = relative_buckets(1, 300, bidirectional=True, num_buckets=32, max_distance=128)[0]
    # Keys after the query use buckets 16..31: distances 1..7 exact, then distance n gets
    # 8 + floor(8 * log(n/8) / log(128/8)): 12 -> 9, 90 -> 14, 91 and beyond -> 15 (the last).
    assert bidirectional[:8].tolist() == [0, 17, 18, 19, 20, 21, 22, 23]
    assert (bidirectional[8], bidirectional[12], bidirectional[90]) == (24, 25, 30)
    assert bidirectional[91:].eq(31).all()
    assert bidirectional.diff().ge(0).all()  # farther never means a lower bucket
    keys_before = relative_buckets(300, 1, bidirectional=False, num_buckets=32, max_distance=128)[:, 0]
    # Causal: keys at or before the query, distances 0..15 exact, then 16 + floor(16 * log(n/16)
    # / log(128/16)): 18 -> 16, 19 -> 17, 112 -> 30, 113 and beyond -> 31.
    assert keys_before[:16].tolist() == list(range(16))
    assert (keys_before[18], keys_before[19], keys_before[112]) == (16, 17, 30)
    assert keys_before[113:].eq(31).all()
    future = relative_buckets(1, 5, bidirectional=False, num_buckets=32, max_distance=128)[0]
    assert future.tolist() == [0, 0, 0, 0, 0]  # the decoder never attends there anyway


# --- encoder-decoder contract --------------------------------------------------------------------


def test_contract_shapes(model):
    assert is_encoder_decoder(model) and model.is_causal is False
    x, y = ids(2, 12), ids(2, 7, seed=2)
    encoded = model.encode(x, torch.ones_like(x, dtype=torch.bool))
    assert encoded.shape == (2, 12, 64)
    hidden = model.decode(y, encoded, torch.ones_like(x, dtype=torch.bool))
    assert hidden.shape == (2, 7, 64) and model.logits(hidden).shape == (2, 7, VOCAB)
    torch.testing.assert_close(model(x, None, y), hidden)


def test_decoder_is_causal_and_sees_the_whole_encoder(model):
    x, y = ids(2, 12), ids(2, 9, seed=2)
    later = y.clone()
    later[:, 5:] = (later[:, 5:] + 1) % VOCAB
    other_end = x.clone()
    other_end[:, -1] = (other_end[:, -1] + 1) % VOCAB
    with torch.no_grad():
        before = model(x, None, y)
        torch.testing.assert_close(model(x, None, later)[:, :5], before[:, :5])
        assert not torch.allclose(model(x, None, other_end)[:, 0], before[:, 0])


def test_padding_changes_nothing_real(model):
    x, y = ids(2, 12), ids(2, 9, seed=2)
    mask, decoder_mask = torch.ones_like(x, dtype=torch.bool), torch.ones_like(y, dtype=torch.bool)
    mask[1, 7:] = False
    decoder_mask[1, 4:] = False
    other_x = torch.where(mask, x, (x + 17) % VOCAB)
    other_y = torch.where(decoder_mask, y, (y + 17) % VOCAB)
    with torch.no_grad():
        before = model(x, mask, y, decoder_mask)
        after = model(other_x, mask, other_y, decoder_mask)
        alone = model(x[1:, :7], None, y[1:, :4])
    torch.testing.assert_close(before[decoder_mask], after[decoder_mask])
    torch.testing.assert_close(before[1, :4], alone[0], atol=1e-5, rtol=1e-5)  # as if never padded


def test_all_padding_decoder_rows_keep_gradients_finite():
    model = tiny().train()
    x, y = ids(2, 12), ids(2, 9, seed=2)
    mask, decoder_mask = torch.ones_like(x, dtype=torch.bool), torch.ones_like(y, dtype=torch.bool)
    mask[1, 3:] = False
    decoder_mask[1] = False
    logits = model.logits(model(x, mask, y, decoder_mask))
    labels = torch.where(decoder_mask, y, -100)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_autocast_runs_and_stays_close(model):
    x, y = ids(2, 12), ids(2, 9, seed=2)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        full = model.logits(model(x, mask, y))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.logits(model(x, mask, y))
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def test_longer_than_max_positions_is_refused():
    model = tiny(max_positions=16)
    with pytest.raises(ScratchLMError, match="max_positions=16"):
        model.encode(ids(1, 17))
    with pytest.raises(ScratchLMError, match="max_positions=16"):
        model.decode(ids(1, 17), torch.zeros(1, 4, 64), None)


def test_init_scales_queries_by_head_width_and_is_a_step():
    model = build_model("t5", build_config("t5", "tiny", vocab_size=VOCAB))  # D 128, K 32
    qkv = model.encoder.blocks[0].attn.qkv.weight
    assert qkv[:128].std().item() == pytest.approx((128 * 32) ** -0.5, rel=0.05)
    assert qkv[128:].std().item() == pytest.approx(128**-0.5, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    model.init_weights()
    assert not any((p == 3.0).all() for p in model.parameters())


def test_no_buffers_and_num_params(model):
    assert list(model.buffers()) == []
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embeddings=True) == model.num_params() - tables


# --- greedy decoding -----------------------------------------------------------------------------


def test_greedy_decode_takes_the_argmax_at_every_step(model):
    x = ids(2, 10)
    out = greedy_decode(model, x, None, start_id=0, max_new_tokens=6)
    assert out.shape == (2, 7) and out[:, 0].eq(0).all()
    with torch.no_grad():
        logits = model.logits(model(x, None, out[:, :-1]))
    assert torch.equal(logits.argmax(-1), out[:, 1:])  # teacher-forced argmax reproduces it
    assert model.training is False


def test_greedy_decode_stops_rows_at_eos_and_pads_them(model):
    x = ids(2, 10)
    free = greedy_decode(model, x, None, start_id=0, max_new_tokens=8)
    eos = int(free[0, 3])  # row 0 would produce this token at step 3
    out = greedy_decode(model, x, None, start_id=0, max_new_tokens=8, eos_id=eos, pad_id=0)
    first = int((free[0, 1:] == eos).nonzero()[0]) + 1  # the step where row 0 first meets it
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert out[0, first + 1 :].eq(0).all()
    ends = [(row[1:] == eos).nonzero() for row in free]
    if all(len(e) for e in ends):  # every row finished: decoding stopped at the last one
        assert out.shape[1] == 1 + max(int(e[0]) + 1 for e in ends)
