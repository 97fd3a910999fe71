"""The softmax work of one chunk of our fused cross-entropy as a single Triton kernel, for GPUs.

Its spec is ``objectives.cross_entropy.softmax_chunk``: for each row of low-precision logits, the
target's logit less the row's highest, the row's sum of exp(logit - highest) and, given row
weights, the gradient (softmax - one-hot) · weight written over the logits. One program per row
reads the row twice and writes it once: a first pass finds the highest logit and the sum of
exponentials together (the sum rescaled each time the highest grows), a second writes the
gradient. ``torch.compile`` of the spec makes a reduction kernel and a pointwise one that read the
logits three times between them: on an H100, a chunk of 5341 × 50304 bf16 logits took 0.86 ms
compiled and 0.56 ms here, 2.9 TB/s (``benchmarks/kernels.py``, ``kernel=loss_chunk``).
Liger-Kernel's cross-entropy kernel makes the same two passes, but its launcher reads the count of
scored rows back to the host (a wait for the GPU each chunk) and stores per-row losses in the
logits' low precision.

Triton comes with PyTorch's CUDA builds, not with its CPU ones: ``objectives.cross_entropy`` imports
this module only for a device in its ``TRITON_SOFTMAX``, and asks :data:`AVAILABLE` first.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 4096
"""Logits a program holds at once (a power of two): 50304 columns take 13 steps a pass."""

WARPS = 8
"""Warps per program: 256 threads, 16 logits each per step. From 2048 logits a program on, the
launch shape hardly mattered on an H100 (0.56-0.58 ms a chunk with 4 to 16 warps; 1024 logits,
0.61-1.01 ms; ``kernel=loss_chunk_launch``)."""

AVAILABLE = triton is not None
"""Whether Triton is installed (the kernel compiles on first use, for the GPU at hand)."""


if triton is not None:

    @triton.jit
    def _softmax_rows_kernel(
        logits_ptr, row_stride, n_cols, targets_ptr, weights_ptr, shifted_target_ptr, sum_exp_ptr,
        WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # rows × columns may pass 2**31
        row_ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        top = float("-inf")
        total = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, tl.max(x, axis=0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), axis=0)
            top = new_top
        tl.store(shifted_target_ptr + row, tl.load(row_ptr + target).to(tl.float32) - top)
        tl.store(sum_exp_ptr + row, total)
        if WITH_GRAD:
            weight = tl.load(weights_ptr + row)
            scale = weight / total
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
                grad = tl.exp(x - top) * scale - tl.where(cols == target, weight, 0.0)
                tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


def softmax_rows(
    logits_nV: torch.Tensor,
    targets_n1: torch.Tensor,
    row_weight_n1: torch.Tensor | None,
    block: int = BLOCK,
    warps: int = WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``softmax_chunk`` returns and writes, for logits whose rows are contiguous (fp32 row
    weights and results, one per row). ``block`` and ``warps`` are the launch's shape."""
    rows, cols = logits_nV.shape
    if logits_nV.stride(1) != 1:
        raise ValueError("softmax_rows needs logits whose rows are contiguous")
    with_grad = row_weight_n1 is not None
    if with_grad and row_weight_n1.dtype != torch.float32:
        raise ValueError(f"softmax_rows needs fp32 row weights, got {row_weight_n1.dtype}")
    # Fresh copies of the chunk's share of the per-row inputs: Triton compiles a kernel for each
    # 16-byte alignment of its pointers, and a chunk's slice of the rows may start anywhere.
    targets_n1 = targets_n1.clone(memory_format=torch.contiguous_format)
    row_weight_n1 = row_weight_n1.clone(memory_format=torch.contiguous_format) if with_grad else None
    shifted_target_n1 = torch.empty(rows, 1, dtype=torch.float32, device=logits_nV.device)
    sum_exp_n1 = torch.empty_like(shifted_target_n1)
    if rows:
        _softmax_rows_kernel[(rows,)](
            logits_nV, logits_nV.stride(0), cols, targets_n1,
            row_weight_n1 if with_grad else sum_exp_n1,  # not read without the gradient
            shifted_target_n1, sum_exp_n1,
            WITH_GRAD=with_grad, BLOCK=block, num_warps=warps,
        )
    return shifted_target_n1, sum_exp_n1
