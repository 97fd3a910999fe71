import torch

from scratchlm.models.layers import MLP, SelfAttention, build_attention_mask


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
