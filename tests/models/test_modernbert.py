"""ModernBERT and its causal twin; the contract every family shares is tested in test_models.py."""

import pytest
import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.models import FAMILIES, ModernBert, ModernBertCausal, ModernBertConfig, build_config, build_model
from scratchlm.models.layers import positions_in_documents

VOCAB = 300
FAMILIES_HERE = ["modernbert", "modernbert-causal"]
LONG = 100
"""A length well past the tiny preset's half window (32): local blocks then see only part of it."""


def tiny(family: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(family, build_config(family, "tiny", vocab_size=VOCAB, **overrides)).eval()


def ids(batch: int = 2, length: int = LONG, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- config and registry -------------------------------------------------------------------------


def test_two_families_share_one_backbone():
    encoder, twin = FAMILIES["modernbert"], FAMILIES["modernbert-causal"]
    assert (encoder.model, encoder.causal, encoder.objective) == (ModernBert, False, "mlm")
    assert (twin.model, twin.causal, twin.objective) == (ModernBertCausal, True, "clm")
    assert encoder.config is twin.config is ModernBertConfig
    assert issubclass(ModernBertCausal, ModernBert)


def test_presets_have_the_documented_sizes():
    sizes = {
        size: (c.d_model, c.n_layers, c.n_heads, c.d_ff, c.max_positions, c.local_window, c.global_every)
        for size in ("tiny", "small", "base")
        for c in [build_config("modernbert", size, vocab_size=100)]
    }
    assert sizes == {
        "tiny": (128, 4, 4, 256, 512, 64, 3),
        "small": (512, 8, 8, 768, 1024, 128, 3),
        "base": (768, 22, 12, 1152, 8192, 128, 3),
    }
    base = build_config("modernbert-causal", "base", vocab_size=100)
    thetas_eps_dropout = (base.global_rope_theta, base.local_rope_theta, base.norm_eps, base.dropout)
    assert thetas_eps_dropout == (160_000.0, 10_000.0, 1e-5, 0.0)


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_base_is_modernbert_base(family):
    """149.7M parameters with ModernBERT's 50368-token vocabulary, as HF's ModernBertForMaskedLM
    (and its decoder twin) count for answerdotai/ModernBERT-base's config."""
    with torch.device("meta"):  # counts shapes without allocating or initialising
        model = build_model(family, build_config(family, "base", vocab_size=50368))
    assert (model.num_params(), model.num_params(exclude_embeddings=True)) == (149_655_232, 110_972_608)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(local_window=63), r"model\.arch\.local_window=63: must be even"),
        (dict(local_window=0), r"model\.arch\.local_window=0: must be a positive integer"),
        (dict(global_every=0), r"model\.arch\.global_every=0: must be a positive integer"),
        (dict(global_rope_theta=1.0), r"model\.arch\.global_rope_theta=1\.0: must be a number above 1"),
        (dict(local_rope_theta="big"), r"model\.arch\.local_rope_theta='big'"),
        (dict(d_model=12, n_heads=4), r"model\.arch\.d_model=12 / model\.arch\.n_heads=4 gives an odd"),
        (dict(norm_eps=0.0), r"model\.arch\.norm_eps=0\.0"),
    ],
)
def test_bad_fields_are_named(overrides, message):
    with pytest.raises(ScratchLMError, match=message):
        ModernBertConfig(vocab_size=100, **{"d_model": 128, "n_heads": 4, **overrides})


# --- structure and init --------------------------------------------------------------------------


def test_global_blocks_every_third_and_no_attention_norm_in_the_first():
    model = tiny("modernbert", n_layers=7)
    assert [block.is_global for block in model.blocks] == [True, False, False, True, False, False, True]
    assert isinstance(model.blocks[0].attn_norm, nn.Identity)
    assert all(isinstance(block.attn_norm, nn.LayerNorm) for block in model.blocks[1:])


def test_no_biases_but_the_output_bias():
    model = tiny("modernbert")
    assert [name for name, _ in model.named_parameters() if "bias" in name] == ["head.bias"]
    assert all(m.bias is None for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)))


def test_init_is_truncated_normal_with_smaller_residual_writes():
    model = build_model("modernbert", build_config("modernbert", "tiny", vocab_size=VOCAB, n_layers=8))
    reads = torch.cat([torch.cat([b.attn.qkv.weight.flatten(), b.mlp.fc.weight.flatten()]) for b in model.blocks])
    writes = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.mlp.proj.weight.flatten()]) for b in model.blocks])
    assert reads.abs().max() <= 2 * 0.02 and writes.abs().max() <= 2 * 0.02 / 4  # cut at 2 sigma
    # A normal truncated at ±2σ keeps 0.880 of its σ.
    assert reads.std().item() == pytest.approx(0.02 * 0.880, rel=0.05)
    assert writes.std().item() == pytest.approx(0.02 / 4 * 0.880, rel=0.05)
    assert model.head.bias.abs().max() == 0 and torch.equal(model.final_norm.weight, torch.ones(128))


# --- masks and positions -------------------------------------------------------------------------


def test_local_windows_follow_hf_for_each_mode():
    """local_window=8: the encoder sees 4 tokens on each side, the twin itself and 3 before."""
    config = build_config("modernbert", "tiny", vocab_size=VOCAB, local_window=8)
    distance = torch.arange(10)[:, None] - torch.arange(10)[None, :]  # query - key
    encoder_band = ModernBert(config).window_band(10, torch.device("cpu"))
    causal_band = ModernBertCausal(config).window_band(10, torch.device("cpu"))
    assert torch.equal(encoder_band, distance.abs() <= 4)
    assert torch.equal(causal_band, (distance >= 0) & (distance <= 3))
    assert ModernBert(config).window_band(5, torch.device("cpu")) is None  # the window spans it all
    assert ModernBertCausal(config).window_band(4, torch.device("cpu")) is None


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_local_window_acts_only_on_sequences_longer_than_it(family):
    narrow, wide = tiny(family), tiny(family, local_window=256)
    wide.load_state_dict(narrow.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(narrow(ids(length=30)), wide(ids(length=30)))
        assert not torch.allclose(narrow(ids()), wide(ids()), atol=1e-3)


def test_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]])
    assert torch.equal(positions_in_documents(doc_ids), expected)


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_a_packed_document_computes_what_it_would_alone(family):
    """Attention stays inside the document and its positions restart at 0, so the second of two
    packed documents gives what it gives alone; changing the first changes nothing in it."""
    model = tiny(family)
    x = ids(batch=1, length=LONG)
    doc_ids = torch.tensor([[0] * 45 + [1] * 50 + [-1] * 5])
    changed = x.clone()
    changed[0, :45] = (changed[0, :45] + 1) % VOCAB
    with torch.no_grad():
        packed = model(x, doc_ids=doc_ids)
        alone = model(x[:, 45:95])
        other_first = model(changed, doc_ids=doc_ids)
    torch.testing.assert_close(packed[:, 45:95], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other_first[:, 45:95], packed[:, 45:95])
    assert not torch.allclose(other_first[:, :45], packed[:, :45])


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_padding_changes_no_real_token_past_the_window(family):
    model = tiny(family)
    x = ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 70:] = False
    other_pads = torch.where(mask, x, (x + 17) % VOCAB)
    with torch.no_grad():
        before, after = model(x, mask), model(other_pads, mask)
        alone = model(x[1:, :70])
    torch.testing.assert_close(before[mask], after[mask])
    torch.testing.assert_close(before[1:, :70], alone, atol=1e-5, rtol=1e-5)  # as if never padded


def test_causal_twin_does_not_see_the_future_past_the_window():
    model = tiny("modernbert-causal")
    x = ids()
    changed = x.clone()
    changed[:, 60:] = (changed[:, 60:] + 1) % VOCAB
    with torch.no_grad():
        for mask in (None, torch.ones_like(x, dtype=torch.bool)):
            before, after = model(x, mask), model(changed, mask)
            torch.testing.assert_close(before[:, :60], after[:, :60])
            assert not torch.allclose(before[:, 60:], after[:, 60:])


def test_encoder_sees_both_directions():
    model = tiny("modernbert")
    x = ids()
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 0], model(changed)[:, 0])


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_bf16_autocast_runs(family):
    """Rotary embeddings are applied in fp32; q and k must still reach SDPA in v's dtype."""
    model = tiny(family)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(ids(length=40), torch.ones(2, 40, dtype=torch.bool))
        logits = model.logits(hidden)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
