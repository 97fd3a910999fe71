"""Our CPU pieces against the plain PyTorch they replace, at the throughput benchmark's shapes.

Each piece the models run on CPU in fp32 or bf16 instead of the plain formula, timed forward
plus backward (median of ``--reps``, each rep after a sweep over a buffer larger than the caches,
so that the inputs come from memory as they do inside a training step) against that formula, and
checked against it (outputs and every input gradient, ``max_abs_diff``):

    kernel=<k> scratchlm_ms=<a> torch_ms=<b> ratio=<b/a> max_abs_diff=<d>

ratio > 1: ours is faster. Under bf16 the differences are bf16 rounding: about 1.0 on the weight
gradient's values of ~300. Shapes: batch 32 × sequence 128, width 256, 4 heads of 64, MLP 1024
(GELU) or 688 (SwiGLU), as ``benchmarks/throughput.py``'s fixed config.

    rms_norm           RMSNorm, compiled each way            F.rms_norm (ATen's composite)
    gated_linear       two matmuls, compiled gate            F.linear, F.silu(a) * b on its halves
    gated_linear_bf16  one matmul, compiled gate on halves   the same under bf16 autocast
    rotary_split       q, k rotated in one autograd node,    split_heads, then apply_rope twice
                       compiled
    rotary_split_bf16  the same in bf16                      the same, cast to bf16
    linear_gelu_tanh   matmul, compiled bias + GELU          F.linear, F.gelu(approximate="tanh")
    linear_gelu_tanh_bf16   the same under bf16 autocast     the same under bf16 autocast
    attention          causal, fp32: kernels/cpu_attention   F.scaled_dot_product_attention
    attention_bf16     causal, bf16: matmuls, fp32 softmax   F.scaled_dot_product_attention

    python benchmarks/cpu_kernels.py [--reps 20] [--threads N]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scratchlm.models.layers import (
    RMSNorm,
    apply_rope,
    gated_linear,
    linear_gelu,
    rope_cos_sin,
    rotary_split_heads,
    sdpa,
    split_heads,
)

B, T, D, H, FF, FF_GATED = 32, 128, 256, 4, 1024, 688
EVICT_BYTES = 1 << 30
"""Swept before each timed rep: larger than any cache the machine reports (L3 here: 480 MiB)."""


def leaf(*shape, scale=1.0, generator=None):
    return (scale * torch.randn(*shape, generator=generator)).requires_grad_()


def run(fn, inputs, grad_out):
    """One forward and backward; returns the output and the inputs' gradients."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, grad_out)
    return [o.detach() for o in out] + [t.grad for t in inputs]


def time_ms(fn, inputs, grad_out, reps: int, evict: torch.Tensor) -> float:
    for _ in range(3):
        run(fn, inputs, grad_out)
    times = []
    for _ in range(reps):
        evict.add_(1.0)
        start = time.perf_counter()
        run(fn, inputs, grad_out)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cases():
    """(name, ours, plain, inputs, upstream gradients)."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    yield (
        "rms_norm",
        lambda x, w: norm(x),
        lambda x, w: F.rms_norm(x, (D,), w, 1e-6),
        [leaf(B, T, D, generator=g), norm.weight],
        (torch.randn(B, T, D, generator=g),),
    )
    def swiglu(x, w):
        a, b = F.linear(x, w).chunk(2, dim=-1)
        return F.silu(a) * b

    yield (
        "gated_linear",
        lambda x, w: gated_linear(x, w, "silu"),
        swiglu,
        [leaf(B, T, D, generator=g), leaf(2 * FF_GATED, D, scale=0.05, generator=g)],
        (torch.randn(B, T, FF_GATED, generator=g),),
    )
    cos, sin = rope_cos_sin(torch.arange(T), D // H, theta=10000.0)

    def split_then_rope(packed):
        q, k, v = split_heads(packed, [H, H, H])
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    yield (
        "rotary_split",
        lambda packed: rotary_split_heads(packed, cos, sin, [H, H, H]),
        split_then_rope,
        [leaf(B, T, 3 * H, D // H, generator=g)],
        tuple(torch.randn(B, H, T, D // H, generator=g) for _ in range(3)),
    )
    yield (
        "linear_gelu_tanh",
        lambda x, w, b: linear_gelu(x, w, b, "tanh"),
        lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"),
        [leaf(B, T, D, generator=g), leaf(FF, D, scale=0.05, generator=g), leaf(FF, generator=g)],
        (torch.randn(B, T, FF, generator=g),),
    )

    def under_bf16_autocast(fn):
        def wrapped(*inputs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*inputs)

        return wrapped

    yield (
        "linear_gelu_tanh_bf16",
        under_bf16_autocast(lambda x, w, b: linear_gelu(x, w, b, "tanh")),
        under_bf16_autocast(lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh")),
        [leaf(B, T, D, generator=g), leaf(FF, D, scale=0.05, generator=g), leaf(FF, generator=g)],
        (torch.randn(B, T, FF, generator=g).bfloat16(),),
    )

    yield (
        "gated_linear_bf16",
        under_bf16_autocast(lambda x, w: gated_linear(x, w, "silu")),
        under_bf16_autocast(swiglu),
        [leaf(B, T, D, generator=g), leaf(2 * FF_GATED, D, scale=0.05, generator=g)],
        (torch.randn(B, T, FF_GATED, generator=g).bfloat16(),),
    )
    yield (
        "rotary_split_bf16",
        lambda packed: rotary_split_heads(packed, cos, sin, [H, H, H]),
        lambda packed: tuple(t.to(packed.dtype) for t in split_then_rope(packed)),
        [leaf(B, T, 3 * H, D // H, generator=g).detach().bfloat16().requires_grad_()],
        tuple(torch.randn(B, H, T, D // H, generator=g).bfloat16() for _ in range(3)),
    )

    def attention(fn):
        def heads(packed):
            q, k, v = split_heads(packed, [H, H, H])
            return fn(q, k, v, is_causal=True)

        return heads

    yield (
        "attention",
        attention(sdpa),
        attention(F.scaled_dot_product_attention),
        [leaf(B, T, 3 * H, D // H, generator=g)],
        (torch.randn(B, H, T, D // H, generator=g),),
    )
    yield (
        "attention_bf16",
        attention(sdpa),
        attention(F.scaled_dot_product_attention),
        [leaf(B, T, 3 * H, D // H, generator=g).detach().bfloat16().requires_grad_()],
        (torch.randn(B, H, T, D // H, generator=g).bfloat16(),),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, inputs out of cache")
    evict = torch.zeros(EVICT_BYTES // 4)
    for name, ours, plain, inputs, grad_out in cases():
        got, want = run(ours, inputs, grad_out), run(plain, inputs, grad_out)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want, strict=True))
        ours_ms = time_ms(ours, inputs, grad_out, args.reps, evict)
        plain_ms = time_ms(plain, inputs, grad_out, args.reps, evict)
        print(
            f"kernel={name} scratchlm_ms={ours_ms:.3f} torch_ms={plain_ms:.3f} "
            f"ratio={plain_ms / ours_ms:.2f} max_abs_diff={diff:.2e}"
        )


if __name__ == "__main__":
    main()
