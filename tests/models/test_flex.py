"""Document masks through FlexAttention (GPU) compute what the dense SDPA mask computes.

FlexAttention has no backward on CPU, so the library uses it on CUDA only; here its forward runs
on CPU, uncompiled, by declaring CPU a flex device for the test.
"""

import pytest
import torch

from scratchlm.models import build_config, build_model
from scratchlm.models import layers

FAMILIES = ["gpt2", "bert", "llama"]


@pytest.fixture
def flex_on_cpu(monkeypatch):
    if layers.flex_attention is None:
        pytest.skip("this PyTorch has no FlexAttention")
    monkeypatch.setattr(layers, "FLEX_DEVICES", {"cpu"})
    monkeypatch.setitem(layers._flex_state, "compiled", layers.flex_attention)  # eager on CPU
    monkeypatch.setitem(layers._flex_state, "failed", False)


def packed_batch(vocab: int):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (2, 24), generator=generator)
    doc_ids = torch.tensor([[0] * 7 + [1] * 11 + [2] * 6, [0] * 20 + [-1] * 4])
    return ids, doc_ids


def tiny(family: str):
    torch.manual_seed(0)
    arch = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64}
    if family == "llama":
        arch["n_kv_heads"] = 2
    return build_model(family, build_config(family, "tiny", vocab_size=97, **arch)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_document_masks_match_the_dense_mask(family, flex_on_cpu, monkeypatch):
    model = tiny(family)
    ids, doc_ids = packed_batch(97)
    assert isinstance(layers.build_attention_mask(None, causal=True, doc_ids=doc_ids, flex=True), layers.FlexMask)
    with torch.no_grad():
        flex = model(ids, doc_ids=doc_ids)
        monkeypatch.setattr(layers, "FLEX_DEVICES", set())
        dense = model(ids, doc_ids=doc_ids)
    real = doc_ids >= 0
    torch.testing.assert_close(flex[real], dense[real], atol=1e-5, rtol=1e-5)


def test_a_failing_flex_kernel_falls_back_to_the_dense_mask_with_one_warning(flex_on_cpu, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setitem(layers._flex_state, "compiled", broken)
    model = tiny("gpt2")
    ids, doc_ids = packed_batch(97)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="FlexAttention failed"):
            fallen = model(ids, doc_ids=doc_ids)
        monkeypatch.setattr(layers, "FLEX_DEVICES", set())
        dense = model(ids, doc_ids=doc_ids)
    torch.testing.assert_close(fallen, dense)
    assert layers._flex_state["failed"]


def test_every_layer_of_a_forward_shares_one_block_mask(flex_on_cpu, monkeypatch):
    built = []

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    real = layers.create_block_mask
    monkeypatch.setattr(layers, "create_block_mask", counting)
    model = tiny("llama")
    assert model.config.n_layers == 2
    ids, doc_ids = packed_batch(97)
    with torch.no_grad():
        model(ids, doc_ids=doc_ids)
    assert len(built) == 1
    with torch.no_grad():
        model(ids, doc_ids=doc_ids)
    assert len(built) == 2  # a new batch, a new mask


@pytest.mark.parametrize("causal", [True, False])
def test_the_compiled_block_mask_is_the_eager_one(causal):
    """On GPUs the block mask is built through torch.compile: for new batches (no recompiling in
    between, as every training step brings one) it equals the eager build, block for block."""
    if layers.flex_attention is None:
        pytest.skip("this PyTorch has no FlexAttention")
    generator = torch.Generator().manual_seed(0)
    B, T = 3, 384  # three key/query blocks of 128
    for _ in range(2):
        cuts = torch.sort(torch.randint(1, T, (B, 3), generator=generator), dim=1).values
        doc_ids = (torch.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1)
        doc_ids[0, -50:] = -1  # padding
        mask = layers.FlexMask(None, doc_ids, causal)
        compiled, eager = mask._build_block_mask(compiled=True), mask._build_block_mask(compiled=False)
        for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(compiled, field), getattr(eager, field)), field
