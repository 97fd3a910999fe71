"""Llama specifics; the contract every family shares is tested in test_models.py."""

import math

import pytest
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.models import LlamaConfig, build_config, build_model
from scratchlm.models.layers import positions_in_documents

VOCAB = 300


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("llama", build_config("llama", "tiny", vocab_size=VOCAB, **overrides)).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- config --------------------------------------------------------------------------------------


def test_presets_have_the_documented_sizes():
    sizes = {
        size: (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff, c.max_positions, c.tie_embeddings)
        for size in ("tiny", "small", "base")
        for c in [build_config("llama", size, vocab_size=100)]
    }
    assert sizes == {
        "tiny": (128, 4, 4, 2, 352, 512, True),
        "small": (512, 8, 8, 4, 1376, 1024, True),
        "base": (768, 12, 12, 12, 2048, 2048, True),
    }
    for c in (build_config("llama", size, vocab_size=100) for size in ("tiny", "small", "base")):
        assert c.d_ff % 32 == 0 and c.d_ff - 32 < 8 * c.d_model / 3 <= c.d_ff  # 8/3·D rounded up


@pytest.mark.parametrize(
    "size, vocab, total, without_embeddings",
    [("small", 16384, 31_597_056, 23_208_448), ("base", 50257, 123_551_232, 84_953_856)],
)
def test_presets_have_the_documented_parameter_counts(size, vocab, total, without_embeddings):
    with torch.device("meta"):  # counts shapes without allocating or initialising
        model = build_model("llama", build_config("llama", size, vocab_size=vocab))
    assert (model.num_params(), model.num_params(exclude_embeddings=True)) == (total, without_embeddings)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_kv_heads=3), r"model\.arch\.n_kv_heads=3 does not divide model\.arch\.n_heads=4"),
        (dict(n_kv_heads=0), r"model\.arch\.n_kv_heads=0: must be a positive integer"),
        (dict(d_model=12, n_heads=4, n_kv_heads=4), r"model\.arch\.d_model=12 / model\.arch\.n_heads=4 gives an odd"),
        (dict(rope_theta=0.0), r"model\.arch\.rope_theta=0\.0"),
        (dict(tie_embeddings="yes"), r"model\.arch\.tie_embeddings='yes'"),
        (dict(dropout=1.0), r"model\.arch\.dropout=1\.0"),
    ],
)
def test_bad_fields_are_named(overrides, message):
    with pytest.raises(ScratchLMError, match=message):
        LlamaConfig(vocab_size=100, **{"d_model": 128, "n_heads": 4, "n_kv_heads": 2, **overrides})


# --- blocks --------------------------------------------------------------------------------------


def test_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]])
    assert torch.equal(positions_in_documents(doc_ids), expected)


def test_grouped_query_attention_equals_multi_head_with_each_kv_head_repeated_over_its_group():
    """Query heads 2g and 2g+1 share key/value head g (the grouping HF's ``repeat_kv`` uses)."""
    gqa = tiny()  # 4 query heads, 2 key/value heads
    mha = tiny(n_kv_heads=4)
    mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if not k.endswith("attn.qkv.weight")}, strict=False)
    K = 32

    def repeat_over_group(w_GKD: torch.Tensor) -> torch.Tensor:  # rows of heads [0, 1] -> [0, 0, 1, 1]
        return w_GKD.view(2, K, -1).repeat_interleave(2, dim=0).reshape(4 * K, -1)

    with torch.no_grad():
        for ours, theirs in zip(gqa.blocks, mha.blocks):
            q, k, v = ours.attn.qkv.weight.split([4 * K, 2 * K, 2 * K])
            theirs.attn.qkv.weight.copy_(torch.cat([q, repeat_over_group(k), repeat_over_group(v)]))
        x = ids()
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_untied_head_is_its_own_matrix_and_tied_has_none():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.head is None and "head.weight" not in tied.state_dict()
    assert untied.head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == VOCAB * 128
    assert untied.num_params(exclude_embeddings=True) - tied.num_params(exclude_embeddings=True) == VOCAB * 128
    hidden = untied(ids())
    torch.testing.assert_close(untied.logits(hidden), hidden @ untied.head.weight.T)


def test_no_biases_anywhere():
    assert not [name for name, _ in tiny(tie_embeddings=False).named_parameters() if "bias" in name]


def test_init_scales_residual_projections_and_sets_unit_norms():
    model = build_model("llama", build_config("llama", "tiny", vocab_size=VOCAB, d_model=256, d_ff=704))
    projections = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.mlp.proj.weight.flatten()]) for b in model.blocks])
    assert projections.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.gate_up.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.final_norm.weight, torch.ones(256))
    assert torch.equal(model.blocks[2].mlp_norm.weight, torch.ones(256))


# --- documents -----------------------------------------------------------------------------------


def test_with_doc_ids_a_document_computes_what_it_computes_alone():
    """Block-diagonal attention plus positions that restart: the second document of a packed row
    gives the same hidden states as when it is the whole input, at positions 0.."""
    model = tiny()
    x = ids(batch=1, length=14)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 2])
    with torch.no_grad():
        packed = model(x, doc_ids=doc_ids)
        first_alone, second_alone = model(x[:, :5]), model(x[:, 5:12])
        shifted = model(x[:, :12])  # no doc_ids: the second document at positions 5..11
    torch.testing.assert_close(packed[:, :5], first_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 5:12], second_alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shifted[:, 5:12], second_alone, atol=1e-3)  # positions did matter


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = tiny()
    x = ids()
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x, torch.ones_like(x, dtype=torch.bool))
    assert torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.25  # bf16 keeps ~3 significant digits
