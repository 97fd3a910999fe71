"""CPU dropout (its masks and the ``Dropout`` module) and the matmul attention that dropout in
attention runs through on CPU: same results as PyTorch's, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.models import FAMILIES, build_config, build_model
from scratchlm.models.layers import Dropout, keep_mask, matmul_attention, sdpa


def attention_case(B, H, G, Q, T, K, mask_kind, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, K, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, G, T, K, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Q, T, generator=generator) > 0.4
        mask[..., 0] = True  # every query may attend somewhere, as build_attention_mask ensures
    elif mask_kind == "float":  # an additive bias with a gradient (T5's learned positions)
        mask = torch.randn(1, H, Q, T, generator=generator, dtype=torch.float64, requires_grad=True)
    return q, k, v, mask


@pytest.mark.parametrize(
    "B, H, G, Q, T, mask_kind, causal",
    [
        (2, 4, 4, 16, 16, None, True),
        (2, 4, 4, 16, 16, None, False),
        (2, 4, 2, 16, 16, None, True),  # grouped-query attention
        (2, 4, 1, 16, 16, "bool", False),
        (2, 4, 4, 6, 16, "bool", False),  # queries at chosen positions only
        (2, 4, 4, 16, 16, "float", False),
        (1, 2, 2, 12, 16, None, True),  # fewer queries than keys: the triangle from the top left
    ],
)
def test_matmul_attention_matches_sdpa(B, H, G, Q, T, mask_kind, causal):
    q, k, v, mask = attention_case(B, H, G, Q, T, 8, mask_kind)
    inputs = [q, k, v] + ([mask] if mask_kind == "float" else [])
    upstream = torch.randn(B, H, Q, 8, dtype=torch.float64)
    results = []
    for attention in (F.scaled_dot_product_attention, matmul_attention):
        y = attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=G != H)
        results.append([y, *torch.autograd.grad(y, inputs, upstream)])
    for ours, reference in zip(results[1], results[0]):
        torch.testing.assert_close(ours, reference)


def test_matmul_attention_with_dropout_is_attention_over_the_kept_probabilities():
    q, k, v, _ = attention_case(2, 2, 2, 5, 5, 4, None)
    torch.manual_seed(5)
    y = matmul_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    keep = keep_mask((4, 5, 5), 0.3, "cpu").view(2, 2, 5, 5)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    torch.testing.assert_close(y, (probs * keep / 0.7) @ v)
    assert 0 < (~keep).sum() < keep.numel()

    def same_mask_every_call(q, k, v):
        torch.manual_seed(3)
        return matmul_attention(q, k, v, dropout_p=0.3, is_causal=True)

    assert torch.autograd.gradcheck(same_mask_every_call, (q, k, v))


def test_cpu_attention_with_dropout_runs_the_matmul_route(monkeypatch):
    import scratchlm.models.layers as layers

    calls = []
    monkeypatch.setattr(layers, "matmul_attention", lambda *a, **kw: calls.append(kw) or matmul_attention(*a, **kw))
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    torch.testing.assert_close(sdpa(q, k, v, dropout_p=0.0, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert calls == []
    torch.manual_seed(0)
    dropped = sdpa(q, k, v, dropout_p=0.5, is_causal=True)
    torch.manual_seed(0)
    torch.testing.assert_close(dropped, matmul_attention(q, k, v, dropout_p=0.5, is_causal=True))
    assert len(calls) == 1


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = keep_mask((n,), p, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (n,)
    assert abs(keep.double().mean().item() - (1 - p)) < 4.5 * (p * (1 - p) / n) ** 0.5  # 4.5 standard deviations
    # Neighbours and consecutive draws are independent.
    pairs = (keep[:-1] & keep[1:]).double().mean().item()
    assert abs(pairs - (1 - p) ** 2) < 4.5 * (1 / n) ** 0.5
    again = keep_mask((n,), p, "cpu")
    assert abs((keep & again).double().mean().item() - (1 - p) ** 2) < 4.5 * (1 / n) ** 0.5
    assert keep_mask((3, 5, 7), p, "cpu").shape == (3, 5, 7)


def test_dropout_module_drops_and_scales_forward_and_backward():
    dropout = Dropout(0.25)
    assert isinstance(dropout, nn.Dropout) and dict(dropout.state_dict()) == {}
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    assert 0.65 < kept.float().mean().item() < 0.85
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    upstream = torch.randn_like(x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream * kept / 0.75)
    dropout.eval()
    assert dropout(x) is x
    assert Dropout(0.0).train()(x) is x
    assert (Dropout(1.0).train()(x) == 0).all()


def test_every_family_drops_out_through_our_module():
    found = {}
    for family in FAMILIES:
        model = build_model(family, build_config(family, "tiny", vocab_size=64))
        dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert all(type(m) is Dropout for m in dropouts), family
        found[family] = len(dropouts)
    assert all(found[family] > 0 for family in ("bert", "gpt2", "modernbert", "t5", "bart")), found
