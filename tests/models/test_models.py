import math

import pytest
import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.models import FAMILIES, build_config, build_model

VOCAB = 300


def tiny(family: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(family, build_config(family, "tiny", vocab_size=VOCAB, **overrides)).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# Encoder-decoders (t5, bart) have another forward (encode / decode); each tests its own contract.
@pytest.fixture(scope="module", params=[name for name, spec in sorted(FAMILIES.items()) if not spec.encoder_decoder])
def family_model(request):
    return request.param, tiny(request.param)


def test_contract_shapes(family_model):
    family, model = family_model
    hidden = model(ids())
    assert hidden.shape == (2, 12, 128)
    assert model.logits(hidden).shape == (2, 12, VOCAB)
    assert model.is_causal is FAMILIES[family].causal
    assert model.config.vocab_size == VOCAB


def test_head_on_a_subset_equals_the_subset_of_the_full_head(family_model):
    _, model = family_model
    hidden = model(ids())
    chosen = torch.zeros(2, 12, dtype=torch.bool)
    chosen[0, 3] = chosen[1, 7] = chosen[1, 11] = True
    torch.testing.assert_close(model.logits(hidden[chosen]), model.logits(hidden)[chosen])


def test_models_hold_no_buffers(family_model):
    _, model = family_model
    assert list(model.buffers()) == []


def test_explicit_all_real_mask_equals_no_mask(family_model):
    """The mask path and the mask-free (is_causal) path of SDPA compute the same thing."""
    _, model = family_model
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.ones_like(x, dtype=torch.bool)), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, torch.ones_like(x)), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [name for name, spec in sorted(FAMILIES.items()) if spec.causal])
def test_causal_model_does_not_see_the_future(family):
    model = tiny(family)
    x = ids()
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    with torch.no_grad():
        for mask in (None, torch.ones_like(x, dtype=torch.bool)):
            before, after = model(x, mask), model(changed, mask)
            torch.testing.assert_close(before[:, :6], after[:, :6])
            assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_encoder_sees_both_directions():
    model = tiny("bert")
    x = ids()
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 0], model(changed)[:, 0])


def test_real_positions_ignore_what_the_padding_holds(family_model):
    _, model = family_model
    x = ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 8:] = mask[1, 5:] = False
    other_pads = torch.where(mask, x, (x + 17) % VOCAB)
    with torch.no_grad():
        before, after = model(x, mask), model(other_pads, mask)
    torch.testing.assert_close(before[mask], after[mask])
    assert not torch.allclose(before[~mask], after[~mask])  # the padding ids did change something


def test_documents_do_not_see_each_other(family_model):
    _, model = family_model
    x = ids(batch=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 5 + [-1] * 2])
    changed = x.clone()
    changed[0, :5] = (changed[0, :5] + 1) % VOCAB
    with torch.no_grad():
        before = model(x, doc_ids=doc_ids)
        after = model(changed, doc_ids=doc_ids)
    torch.testing.assert_close(before[0, 5:10], after[0, 5:10])
    assert not torch.allclose(before[0, :5], after[0, :5])


def test_all_padding_row_keeps_loss_and_gradients_finite(family_model):
    family, _ = family_model
    model = tiny(family).train()
    x = ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1] = False  # a row with no real token at all
    mask[0, 9:] = False
    hidden = model(x, mask)
    assert torch.isfinite(hidden).all()
    logits = model.logits(hidden)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), torch.where(mask, x, -100).flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sequence_longer_than_the_position_table_is_refused(family_model):
    _, model = family_model
    limit = model.config.max_positions
    with pytest.raises(ScratchLMError, match=f"max_positions={limit}"):
        model(torch.zeros(1, limit + 1, dtype=torch.long))


def test_bert_token_types_default_to_zero():
    model = tiny("bert")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x, token_type_ids=torch.zeros_like(x)), model(x))
        assert not torch.allclose(model(x, token_type_ids=torch.ones_like(x)), model(x))


def test_gpt2_init_scales_residual_projections():
    model = build_model("gpt2", build_config("gpt2", "tiny", vocab_size=VOCAB, n_layers=4, d_model=256, d_ff=1024))
    projections = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.mlp.proj.weight.flatten()]) for b in model.blocks])
    assert projections.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(b.attn.qkv.bias.abs().max() == 0 for b in model.blocks)
    assert torch.equal(model.final_norm.weight, torch.ones(256))


def test_bert_init_is_normal_with_zero_biases():
    model = tiny("bert")
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.head.bias.abs().max() == 0
    assert torch.equal(model.embeddings.norm.weight, torch.ones(128))


def test_init_weights_is_a_step_that_resets(family_model):
    family, _ = family_model
    model = tiny(family)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    model.init_weights()
    for name, value in model.state_dict().items():
        assert not (value == 3.0).all(), name
        assert value.shape == first[name].shape


@pytest.mark.parametrize(
    "family, vocab, expected",
    # The published sizes: BERT-base with its MLM head (HF BertForMaskedLM, no pooler) and GPT-2 small.
    [("bert", 30522, 109_514_298), ("gpt2", 50257, 124_439_808)],
)
def test_base_presets_have_the_classic_parameter_counts(family, vocab, expected):
    with torch.device("meta"):  # counts shapes without allocating or initialising
        model = build_model(family, build_config(family, "base", vocab_size=vocab))
    assert model.num_params() == expected


def test_num_params_counts_the_tied_head_once_and_can_drop_embeddings(family_model):
    _, model = family_model
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    assert model.num_params(exclude_embeddings=True) == model.num_params() - tables
    assert sum(p.numel() for p in model.state_dict().values()) == model.num_params()
