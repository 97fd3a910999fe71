"""The C++ CPU attention kernel against PyTorch's scaled_dot_product_attention, its spec: outputs
and every input's gradient, over the shapes models give it (heads split from a fused QKV
projection, grouped keys, lengths off the kernel's blocks, queries fewer than keys); when it is
taken; and what a failed build leaves (one warning, SDPA's results, no library in the cache)."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from scratchlm.kernels import cpu_attention
from scratchlm.models import layers

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to build the kernel"
)


def _qkv(B, H, G, Q, T, K, fused):
    """Queries (B, H, Q, K) and keys, values (B, G, T, K); with ``fused``, strided views of one
    (B, T, (H + 2G)·K) projection, as the models make them."""
    if fused:
        assert Q == T
        x = torch.randn(B, T, (H + 2 * G) * K).view(B, T, H + 2 * G, K)
        q, k, v = x.split([H, G, G], dim=2)
        return [t.transpose(1, 2).requires_grad_() for t in (q.detach(), k.detach(), v.detach())]
    return [torch.randn(B, n, length, K, requires_grad=True) for n, length in ((H, Q), (G, T), (G, T))]


@needs_compiler
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "B, H, G, Q, T, K, fused",
    [
        (2, 4, 4, 128, 128, 64, True),  # the benchmark's shape, from a fused projection
        (3, 4, 2, 37, 37, 32, False),  # grouped keys, a length off the blocks of 32
        (1, 2, 1, 70, 70, 128, True),
        (2, 2, 2, 5, 70, 64, False),  # fewer queries than keys
        (1, 2, 2, 200, 200, 32, False),  # several query blocks
    ],
)
def test_matches_sdpa_forward_and_backward(causal, B, H, G, Q, T, K, fused):
    torch.manual_seed(0)
    q, k, v = _qkv(B, H, G, Q, T, K, fused)
    grad = torch.randn(B, H, Q, K)
    assert cpu_attention.applies(q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=G != H)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    out = cpu_attention.attention(q, k, v, causal)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=lambda m: f"grad {name}: {m}")


@needs_compiler
def test_scale_is_applied():
    torch.manual_seed(0)
    q, k, v = _qkv(2, 2, 2, 40, 40, 64, fused=False)
    torch.testing.assert_close(
        cpu_attention.attention(q, k, v, True, scale=0.3),
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
    )


@needs_compiler
def test_layers_sdpa_routes_plain_causal_fp32_to_the_kernel(monkeypatch):
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    q, k, v = _qkv(2, 2, 2, 16, 16, 32, fused=False)
    layers.sdpa(q, k, v, is_causal=True)
    layers.sdpa(q, k, v)  # bidirectional stays with SDPA
    layers.sdpa(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool))  # so do masks
    layers.sdpa(q, k, v, is_causal=True, dropout_p=0.1)  # and dropout
    layers.sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    assert calls == [True]


@needs_compiler
def test_applies_only_where_the_kernel_has_a_case():
    q, k, v = _qkv(1, 2, 2, 8, 8, 64, fused=False)
    assert cpu_attention.applies(q, k, v)
    assert not cpu_attention.applies(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert not cpu_attention.applies(*_qkv(1, 2, 2, 8, 8, 16, fused=False))  # no width 16
    keys = cpu_attention.MAX_KEYS
    assert cpu_attention.applies(*_qkv(1, 1, 1, 1, keys, 64, fused=False))
    assert not cpu_attention.applies(*_qkv(1, 1, 1, 1, keys + 1, 64, fused=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_attention.applies(q, k, v)


def test_failed_build_warns_once_and_sdpa_runs(monkeypatch, tmp_path):
    compiler = tmp_path / "c++"  # answers --version, then fails to compile
    compiler.write_text('#!/bin/sh\n[ "$1" = --version ] && echo broken 1.0 && exit 0\necho "error: no" >&2\nexit 1\n')
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCRATCHLM_CACHE_DIR", str(cache))
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setattr(cpu_attention, "_state", {"library": None, "failed": False})
    q, k, v = _qkv(2, 2, 2, 16, 16, 32, fused=False)
    with pytest.warns(UserWarning, match="building the CPU attention kernel failed.*error: no"):
        out = layers.sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert not cpu_attention.applies(q, k, v)  # no second try, no second warning
    assert list(cache.iterdir()) == []  # nothing half-built left behind


@needs_compiler
def test_build_is_cached_under_one_name(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHLM_CACHE_DIR", str(tmp_path))
    first = cpu_attention._build()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    stamp = first.stat().st_mtime_ns
    assert cpu_attention._build() == first and first.stat().st_mtime_ns == stamp  # loaded, not rebuilt
