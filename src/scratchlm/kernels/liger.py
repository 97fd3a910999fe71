"""Liger-Kernel's fused Triton kernels for NVIDIA GPUs (``pip install scratchlm[gpu]``).

Taken where they beat ours on an H200 at llama-base shapes (``benchmarks/results/2026-11-26-h200.md``):
SwiGLU, forward and backward of (16384, 2·2048) bf16 in 0.21-0.33 ms against 0.55-0.62 ms for
``models.layers._Gated``, its spec. Not taken: Liger's RMSNorm (slower than PyTorch's fused
``F.rms_norm`` on CUDA) and its fused linear cross-entropy (no faster than
``objectives.cross_entropy`` at an aligned vocabulary, 2.3x slower at GPT-2's 50257, which it does
not pad).
"""

from collections.abc import Callable
import functools

import torch


def swiglu_kernel(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``silu(a) * b`` for ``a, b = h.chunk(2, dim=-1)``, (..., 2F) -> (..., F), through Liger's
    kernel; None where it cannot run (not a CUDA device, or Liger-Kernel not installed)."""
    if device.type != "cuda" or _swiglu_function() is None:
        return None
    return _swiglu


@functools.cache
def _swiglu_function():
    try:
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction
    except ImportError:
        return None
    return LigerFusedGateUpSiLUMulFunction


def _swiglu(h_BT2F: torch.Tensor) -> torch.Tensor:
    # 2-D in and out: its backward returns the gradient flattened to rows.
    y_NF = _swiglu_function().apply(h_BT2F.reshape(-1, h_BT2F.shape[-1]))
    return y_NF.view(*h_BT2F.shape[:-1], -1)
