"""Our GPU hot-path pieces against Liger-Kernel's fused Triton kernels, at llama-base shapes.

Liger-Kernel (``pip install liger-kernel``) ships Triton kernels for RMSNorm, SwiGLU and the
fused linear cross-entropy. Before any of them goes behind an extra, it must win here, on the
shapes our training runs: one llama-base batch of 16 × 1024 tokens, width 768, SwiGLU width
2048, vocabulary 50257, under bf16 autocast as in ``--trainer.precision bf16-mixed``. Each case
times forward plus backward (CUDA events, median of ``--reps`` after a warm-up) and prints

    kernel=<k> scratchlm_ms=<a> liger_ms=<b> ratio=<b/a> max_abs_diff=<d> [torch_ms=<c>]

where ratio > 1 means ours is faster, and max_abs_diff compares the two results (output and
input gradient) so that the timings are of the same computation. The inputs are what the model
feeds each piece under autocast: the residual stream in fp32 into the norms, the fused gate/up
projection's bf16 output into SwiGLU, the final norm's fp32 output and the fp32 head weight into
the loss. Ours is what runs on the GPU without Liger: ``RMSNorm`` (``F.rms_norm`` there), the
hand-written SwiGLU (``layers._Gated``; with Liger installed, ``layers.gated`` takes Liger's
through ``kernels.liger``), ``linear_cross_entropy``. ``torch_ms``: the hand-written RMSNorm of
the CPU route, and the plain ``F.cross_entropy(F.linear(...))``. The loss case also prints each
side's peak memory. Last, ``kernel=loss_chunk``: the elementwise work of one chunk of our loss
(softmax, loss terms, the logits' gradient), eager against ``torch.compile``d ``softmax_chunk``
(``ratio`` = eager / compiled) with static shapes and (``dynamic_ms``) with the rows dynamic, and
against the Triton kernel of ``TRITON_SOFTMAX`` (``triton_ms``; ``kernel=loss_chunk_launch``: its
launch shapes); and
``kernel=loss_route``: our loss by route (the softmax chunks in Triton or eager, the weight
gradient summed by a mixed-precision ``addmm`` or widened, rows per chunk), to set its defaults
on GPUs; ``kernel=block_mask``: FlexAttention's document mask for a packed batch, built eagerly against
compiled (``layers.FlexMask`` compiles it on GPUs); ``kernel=attention``: one layer's causal
attention by SDPA backend and through FlexAttention.

    python benchmarks/kernels.py            # needs a CUDA GPU and liger-kernel
"""

import argparse
from importlib.metadata import version
import statistics

import torch
import torch.nn.functional as F

from scratchlm.kernels import liger
from scratchlm.models.layers import FlexMask, RMSNorm, _Gated, _RMSNorm
from scratchlm.objectives.cross_entropy import (
    VOCAB_MULTIPLE,
    default_chunk_rows,
    linear_cross_entropy,
    softmax_block,
    softmax_chunk,
)


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forward_backward(fn, *inputs):
    """A closure that runs ``fn(*inputs)`` under bf16 autocast and its backward with a fixed
    upstream gradient, and returns the output and the first input's gradient."""
    upstream = {}

    def step():
        for x in inputs:
            x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(*inputs)
        if y.dim() == 0:
            y.backward()
        else:
            if "g" not in upstream:  # the same for every closure of this shape: comparable gradients
                generator = torch.Generator(device=y.device).manual_seed(1)
                upstream["g"] = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            y.backward(upstream["g"])
        return y.detach(), inputs[0].grad

    return step


def leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=dtype) * scale).requires_grad_()


def report(name, ours, theirs, reps, torch_op=None):
    results = [ours(), theirs()]
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*results))
    ours_ms, liger_ms = time_ms(ours, reps), time_ms(theirs, reps)
    line = f"kernel={name} scratchlm_ms={ours_ms:.3f} liger_ms={liger_ms:.3f} ratio={liger_ms / ours_ms:.2f} max_abs_diff={diff:.3g}"
    if torch_op is not None:
        line += f" torch_ms={time_ms(torch_op, reps):.3f}"
    print(line, flush=True)


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def chunk_passes(logits_nV, targets_n1, row_weight_n1):
    """One chunk of ``objectives.cross_entropy`` after its logits matmul, as it runs on a GPU by
    default (one softmax block per chunk): ``softmax_block`` through an fp32 buffer, its gradient
    written back over the bf16 logits; returns what ``softmax_chunk`` returns."""
    shifted_target = logits_nV.new_empty(logits_nV.shape[0], 1, dtype=torch.float32)
    sum_exp = torch.empty_like(shifted_target)
    work = torch.empty(logits_nV.shape, dtype=torch.float32, device=logits_nV.device)
    softmax_block(logits_nV, work, targets_n1, row_weight_n1, shifted_target, sum_exp)
    return shifted_target, sum_exp


def compare_chunk(rows: int, vocab: int, reps: int) -> None:
    """The elementwise part of one loss chunk by route: eager blocks, ``torch.compile``d
    ``softmax_chunk`` (static shapes, and the rows dynamic), and ``kernels.triton_loss``'s kernel
    at its default launch (``triton_ms``) and at other block sizes and warp counts (one
    ``kernel=loss_chunk_launch`` line each)."""
    from scratchlm.kernels import triton_loss

    generator = torch.Generator(device="cuda").manual_seed(2)
    logits = torch.randn(rows, vocab, device="cuda", generator=generator).to(torch.bfloat16)
    targets = torch.randint(vocab, (rows, 1), device="cuda", generator=generator)
    weights = torch.full((rows, 1), 1.0 / rows, device="cuda")
    compiled = torch.compile(softmax_chunk)  # the kernel's spec compiled, for a chunk of one shape
    dynamic = torch.compile(softmax_chunk, dynamic=True)  # and for chunks of changing rows
    routes = {"eager": chunk_passes, "compiled": compiled, "dynamic": dynamic, "triton": triton_loss.softmax_rows}
    results = []
    for fn in routes.values():
        buffer = logits.clone()
        target, top = fn(buffer, targets, weights)
        results.append((buffer.float(), target, top))
    diff = max((a - b).abs().max().item() for other in results[1:] for a, b in zip(results[0], other))
    clone_ms = time_ms(lambda: logits.clone(), reps)
    ms = {name: time_ms(lambda fn=fn: fn(logits.clone(), targets, weights), reps) - clone_ms for name, fn in routes.items()}
    print(f"kernel=loss_chunk rows={rows} vocab={vocab} eager_ms={ms['eager']:.3f} compiled_ms={ms['compiled']:.3f} "
          f"ratio={ms['eager'] / ms['compiled']:.2f} dynamic_ms={ms['dynamic']:.3f} triton_ms={ms['triton']:.3f} "
          f"max_abs_diff={diff:.3g} clone_ms={clone_ms:.3f} (the clone taken out of each)", flush=True)
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            launch_ms = time_ms(lambda: triton_loss.softmax_rows(logits.clone(), targets, weights, block, warps), reps)
            print(f"kernel=loss_chunk_launch block={block} warps={warps} ms={launch_ms - clone_ms:.3f}", flush=True)


def compare_loss_routes(features, weight, targets, reps: int) -> None:
    """Our loss, forward and backward, by route: the softmax chunks in the Triton kernel or eager,
    the weight gradient summed in fp32 by a mixed-precision ``addmm`` or widened chunk by chunk,
    and rows per chunk (the first line is the route as it stands, the others change one thing
    each)."""
    from scratchlm.objectives import cross_entropy

    default_rows = default_chunk_rows("cuda", weight.shape[0], low_precision=True)
    old_rows = default_chunk_rows("xpu", weight.shape[0], low_precision=True)  # the 256 MB budget
    routes = [("triton", "mixed", default_rows), ("eager", "mixed", default_rows), ("triton", "widened", default_rows),
              ("eager", "widened", old_rows)]
    routes += [("triton", "mixed", rows) for rows in (old_rows, 2048, 8192, 16384)]
    switches = {"triton": cross_entropy.TRITON_SOFTMAX, "mixed": cross_entropy.MIXED_ADDMM}
    saved = {name: set(devices) for name, devices in switches.items()}
    for softmax, weight_grad, rows in routes:
        for name, devices in switches.items():
            (devices.add if name in (softmax, weight_grad) else devices.discard)("cuda")
        step = forward_backward(lambda f, w: linear_cross_entropy(f, w, None, targets, chunk_rows=rows)[0], features, weight)
        print(f"kernel=loss_route softmax={softmax} weight_grad={weight_grad} rows={rows} ms={time_ms(step, reps):.3f} "
              f"peak_mib={peak_mib(step):.0f}", flush=True)
    for name, devices in switches.items():
        devices.clear()
        devices.update(saved[name])


def compare_attention(batch: int, seq: int, d_model: int, head_dim: int, reps: int) -> None:
    """Causal attention of one layer, forward and backward in bf16, by SDPA backend (which one the
    library's ``is_causal`` call gets is PyTorch's choice) and through FlexAttention with a causal
    block mask: ``kernel=attention backend=<b> ms=<t> tflops=<f>`` (the causal half's FLOPs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    heads = d_model // head_dim
    q, k, v = (leaf(batch, heads, seq, head_dim, dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * batch * heads * seq * seq * head_dim * 3.5 / 2  # QK^T and PV, forward + 2.5x backward, half masked
    causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq, seq, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    routes = {"default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
              "flex": lambda: flex(q, k, v, block_mask=causal)}
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        def run(backend=getattr(SDPBackend, name)):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        routes[name.split("_")[0].lower()] = run
    upstream = torch.randn_like(q)
    for name, fn in routes.items():
        def step(fn=fn):
            q.grad = k.grad = v.grad = None
            fn().backward(upstream)
        try:
            ms = time_ms(step, reps)
        except RuntimeError as error:  # a backend that does not take these shapes on this GPU
            print(f"kernel=attention backend={name} unavailable: {str(error).splitlines()[0][:120]}", flush=True)
            continue
        print(f"kernel=attention backend={name} ms={ms:.3f} tflops={flops / ms / 1e9:.0f}", flush=True)


def compare_block_mask(batch: int, seq: int, reps: int) -> None:
    """FlexAttention's document mask for a packed batch (4 documents a block), built eagerly
    against through ``torch.compile`` (what ``layers.FlexMask`` does on GPUs)."""
    generator = torch.Generator(device="cuda").manual_seed(3)
    cuts = torch.sort(torch.randint(1, seq, (batch, 3), device="cuda", generator=generator), dim=1).values
    doc_ids = (torch.arange(seq, device="cuda")[None, :, None] >= cuts[:, None, :]).sum(-1)
    mask = FlexMask(None, doc_ids, causal=True)
    eager_ms = time_ms(lambda: mask._build_block_mask(compiled=False), reps)
    compiled_ms = time_ms(lambda: mask._build_block_mask(compiled=True), reps)
    print(f"kernel=block_mask batch={batch} seq={seq} eager_ms={eager_ms:.3f} compiled_ms={compiled_ms:.3f} "
          f"ratio={eager_ms / compiled_ms:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16 * 1024, help="rows: batch × sequence (default 16384)")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (Liger-Kernel's kernels are Triton kernels for GPUs)")
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        parser.error('needs liger-kernel: pip install -e ".[gpu]"')
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} liger-kernel {version('liger-kernel')}")
    print(f"# rows {args.tokens}, d_model {args.d_model}, d_ff {args.d_ff}, vocab {args.vocab}, bf16 autocast")
    N, D = args.tokens, args.d_model

    norm = RMSNorm(D, eps=1e-5).cuda()
    x = leaf(N, D)
    report(
        "rmsnorm",
        forward_backward(norm, x),
        forward_backward(lambda t: LigerRMSNormFunction.apply(t, norm.weight, norm.eps, 0.0, "llama", False), x),
        args.reps,
        torch_op=forward_backward(lambda t: _RMSNorm.apply(t, norm.weight, norm.eps), x),
    )

    h = leaf(N, 2 * args.d_ff, dtype=torch.bfloat16)
    report(
        "swiglu",
        forward_backward(lambda t: _Gated.apply(t, "silu"), h),
        forward_backward(liger.swiglu_kernel(h.device), h),
        args.reps,
    )

    features = leaf(N, D)
    weight = leaf(args.vocab, D, scale=0.02)
    targets = torch.randint(args.vocab, (N,), device="cuda")
    ours = forward_backward(lambda f, w: linear_cross_entropy(f, w, None, targets)[0], features, weight)
    theirs = forward_backward(lambda f, w: LigerFusedLinearCrossEntropyFunction.apply(f, w, targets)[0], features, weight)
    plain = forward_backward(lambda f, w: F.cross_entropy(F.linear(f, w).float(), targets), features, weight)
    report("linear_cross_entropy", ours, theirs, args.reps, torch_op=plain)
    print(f"# linear_cross_entropy peak MiB: scratchlm {peak_mib(ours):.0f} liger {peak_mib(theirs):.0f} plain {peak_mib(plain):.0f}")
    compare_loss_routes(features, weight, targets, args.reps)
    padded_vocab = -(-args.vocab // VOCAB_MULTIPLE["cuda"]) * VOCAB_MULTIPLE["cuda"]
    # The chunk the library takes: rows from the real vocabulary, width padded.
    compare_chunk(default_chunk_rows("cuda", args.vocab, low_precision=True), padded_vocab, args.reps)
    compare_block_mask(args.tokens // 1024, 1024, args.reps)
    compare_attention(args.tokens // 1024, 1024, D, 64, args.reps)


if __name__ == "__main__":
    main()
