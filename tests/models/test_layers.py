import pytest
import torch

from scratchlm.models.layers import (
    MLP,
    Dropout,
    ResidualLinear,
    SelfAttention,
    build_attention_mask,
    project_heads,
    project_out,
    split_heads,
)


def test_no_mask_inputs_mean_no_mask():
    assert build_attention_mask(None, causal=True) is None
    assert build_attention_mask(None, causal=False) is None


def test_causal_padding_mask_keeps_real_tokens_off_padding():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    mask = build_attention_mask(attention_mask, causal=True)
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    expected_row0 = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool
    )  # the padding query (last row) sees the real keys before it, and itself
    assert torch.equal(mask[0, 0], expected_row0)
    assert not mask[1, 0, 0, 1:].any()  # the real token ignores the padding after it


def test_every_row_can_attend_somewhere_even_all_padding():
    """A fully masked row would make SDPA return NaN on some kernels; the diagonal prevents it."""
    attention_mask = torch.zeros(2, 5, dtype=torch.bool)
    for causal in (True, False):
        mask = build_attention_mask(attention_mask, causal=causal)
        assert mask.any(-1).all()
        assert mask[..., torch.arange(5), torch.arange(5)].all()


def test_bidirectional_padding_mask_hides_padding_keys_only():
    attention_mask = torch.tensor([[True, True, False]])
    mask = build_attention_mask(attention_mask, causal=False)
    assert torch.equal(mask[0, 0, :2], torch.tensor([[True, True, False], [True, True, False]]))


def test_doc_ids_make_a_block_diagonal_mask():
    doc_ids = torch.tensor([[0, 0, 1, 1, -1]])
    mask = build_attention_mask(None, causal=False, doc_ids=doc_ids)[0, 0]
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    causal = build_attention_mask(None, causal=True, doc_ids=doc_ids)[0, 0]
    assert torch.equal(causal, expected.tril())


def test_fused_qkv_attention_matches_a_per_head_reference():
    torch.manual_seed(0)
    attn = SelfAttention(d_model=8, n_heads=2, dropout=0.0, causal=True).eval()
    x = torch.randn(2, 5, 8)
    q, k, v = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias).split(8, dim=-1)
    heads = []
    for h in range(2):
        cols = slice(4 * h, 4 * h + 4)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / 2.0  # sqrt(K) = 2
        scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        heads.append(scores.softmax(-1) @ v[..., cols])
    expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x, None), expected, atol=1e-5, rtol=1e-5)
    full = build_attention_mask(torch.ones(2, 5, dtype=torch.bool), causal=True)
    torch.testing.assert_close(attn(x, full), expected, atol=1e-5, rtol=1e-5)


def test_mlp_gelu_flavours_differ():
    torch.manual_seed(0)
    exact = MLP(4, 16, 0.0, gelu="none")
    tanh = MLP(4, 16, 0.0, gelu="tanh")
    tanh.load_state_dict(exact.state_dict())
    x = torch.randn(3, 4) * 3
    assert not torch.equal(exact(x), tanh(x))
    torch.testing.assert_close(exact(x), tanh(x), atol=1e-2, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("heads", [[2, 2, 2], [2, 1, 1], [2, 2]])
def test_projected_heads_and_every_gradient_match_linear_then_split(bias, heads):
    """``project_heads`` (its own backward on CPU in fp32) against ``split_heads(F.linear(...))``:
    the views, and the gradients of input, weight and bias whichever of the views get one."""
    generator = torch.Generator().manual_seed(0)
    B, T, D, K = 2, 5, 8, 4
    x = torch.randn(B, T, D, generator=generator, requires_grad=True)
    weight = torch.randn(sum(heads) * K, D, generator=generator, requires_grad=True)
    bias_N = torch.randn(sum(heads) * K, generator=generator, requires_grad=True) if bias else None
    leaves = [t for t in (x, weight, bias_N) if t is not None]
    got = project_heads(x, weight, bias_N, heads, K)
    want = split_heads(torch.nn.functional.linear(x, weight, bias_N).view(B, T, -1, K), heads)
    assert type(got[0].grad_fn).__name__ == "_HeadsProjectionBackward"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    grads_out = [torch.randn(w.shape, generator=generator) for w in want]
    for used in [range(len(heads)), [len(heads) - 1], [0]]:
        mine = torch.autograd.grad([got[i] for i in used], leaves, [grads_out[i] for i in used], retain_graph=True)
        theirs = torch.autograd.grad([want[i] for i in used], leaves, [grads_out[i] for i in used], retain_graph=True)
        for g, w in zip(mine, theirs, strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route", ["fused", "dropout", "autocast"])
def test_a_projection_into_the_residual_is_residual_plus_projection(bias, route):
    """``project_out``: the residual summed inside the matmul (no dropout in effect), or the plain
    ``residual + dropout(proj(y))`` (dropout training, autocast): values and gradients as the
    plain sum (the same dropout mask drawn from the same seed)."""
    generator = torch.Generator().manual_seed(0)
    proj = ResidualLinear(6, 4, bias=bias)
    dropout = Dropout(0.5 if route == "dropout" else 0.0)
    y = torch.randn(2, 3, 6, generator=generator, requires_grad=True)
    residual = torch.randn(2, 3, 4, generator=generator, requires_grad=True)
    leaves = [y, residual, *proj.parameters()]
    grad_out = torch.randn(2, 3, 4, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=route == "autocast"):
        torch.manual_seed(1)
        got = project_out(proj, dropout, y, residual)
        torch.manual_seed(1)
        want = residual + dropout(torch.nn.functional.linear(y, proj.weight, proj.bias))
    # Fused, the residual enters the graph through the addmm: first inputs from the result down.
    chain, node = [], got.grad_fn
    while node is not None and len(chain) < 4:
        chain.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    assert ("AddmmBackward0" in chain) == (route == "fused"), chain
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, leaves, grad_out), torch.autograd.grad(want, leaves, grad_out), strict=True):
        torch.testing.assert_close(g, w)
