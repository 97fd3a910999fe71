"""Cross-entropy fused with the vocabulary projection, computed in chunks of rows.

The plain route, ``F.cross_entropy(F.linear(x, W, b).float(), y)``, writes the whole (N, V) fp32
logit matrix, then its log-softmax, then in backward a zero-filled gradient of the same size and
the log-softmax gradient: four passes over N·V floats (134 MB each for 4096 tokens and a vocabulary
of 8192) around three matmuls that are the real work. Here the rows go through in chunks: for
each chunk, the logits (one matmul), then block by block, in blocks small enough to stay in cache,
the softmax's terms (one exponential per logit, in place), the loss terms and, when a gradient is
wanted, the softmax minus one-hot written over the logits; then that gradient turned straight into
the chunk's gradients of ``x``, ``W`` and ``b`` (two matmuls). Backward then only scales the stored
gradients by the incoming one. The same FLOPs, no N×V tensor alive at any time, and on two CPU
cores 44% less time than the plain route for the head and loss in fp32, 71% less under bf16
autocast (forward and backward for N=4096, D=256, V=8192: fp32 326 → 183 ms, bf16 227 → 65 ms;
``benchmarks/head_loss.py``). Liger-Kernel's fused
linear cross-entropy does the same on GPUs with Triton; this one is plain PyTorch and runs
anywhere, with the softmax work of each chunk in one Triton kernel on CUDA (``TRITON_SOFTMAX``).
"""

import warnings

import torch
import torch.nn.functional as F

from scratchlm.models.layers import frees_saved_tensors
from scratchlm.objectives.batch import IGNORE_INDEX

CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 1 << 30}
"""Bytes of fp32 logits per chunk (the rows that go through the matmuls together), by device type:
small on CPUs, where ``MIN_CHUNK_ROWS`` decides for all but small vocabularies; on accelerators,
where each chunk costs a few kernel launches and a pass over the weight gradient, larger
(``DEFAULT_CHUNK_BYTES`` where the device type is not named). The rows are then shared out evenly
between the chunks that many rows need. On an H100 (16384 rows, width 768, vocabulary 50257,
bf16 autocast, forward and backward, ``benchmarks/kernels.py``): 10.5 ms in chunks of 1335 rows
(the 256 MB budget), 9.8 of 2048, 8.8 of 4096 (this budget: 5341 rows, evened out to 4 × 4096),
9.1 of 8192, 9.7 in one chunk; the loss's memory 243, 319, 516, 908 and 1694 MiB."""

DEFAULT_CHUNK_BYTES = 256 << 20

SOFTMAX_BYTES = {"cpu": 2 << 20}
"""Bytes of fp32 per block of the softmax and its gradient inside a chunk, by device type: about a
core's L2 cache, so the elementwise passes stay in it (1 to 4 MB measured alike on two cores; at
256 KB the per-op overhead shows). Elsewhere a block is the whole chunk."""

VOCAB_MULTIPLE = {"cuda": 64}
"""The vocabulary is padded to a multiple of this for the matmuls, by device type (1 elsewhere):
the padded rows of the weight are zeros, and a bias of -inf gives their logits no probability,
so loss and gradients are those of the real vocabulary. A row stride that is not a multiple of 8
bf16 values makes cuBLAS fall back to slow kernels: forward and backward of 16384 rows, width 768,
under bf16 autocast on an H200 took 47 ms with GPT-2's 50257 tokens and 20 ms with 50304
(``benchmarks/kernels.py``), a training step of llama-base 98 ms against 71 ms. Not on CPU,
where the padded route was no faster (N=4096, D=256, V=50257, two cores: fp32 1.57 s against
1.44 s unpadded, bf16 0.73 s both)."""

MIN_CHUNK_ROWS = {"fp32": 512, "low": 512}
"""The fewest rows a chunk gets, whatever the byte budget says: every chunk also makes one pass
over the whole V×D weight gradient (its matmul accumulates into it; in bf16 or fp16 an fp32 add
of the chunk's low-precision result follows), a cost that only more rows amortise. Without this
floor a 50257-token vocabulary got 20-row chunks on CPU, and the fused route ran slower than the
plain one (N=4096, D=256, two cores: fp32 2.55 s against 1.91 s plain, 1.34 s with 256 rows;
bf16 autocast 5.23 s against 1.64 s plain, 1.02 s with 512 rows). In fp32, 512 rows against 256,
interleaved in one process: 0.96 of the time at V=8192 and at 50257, 0.99 at 32768; whole training
steps of the throughput benchmark 0.98-0.99 (gpt2, three runs), 0.97 (bert), 1.00 (llama). In bf16
1024 rows were no faster (0.97 head and loss, 1.00 a gpt2 step)."""


TRITON_SOFTMAX = {"cuda"}
"""Device types whose chunks do their softmax work in one Triton kernel where Triton is installed
(``kernels.triton_loss``, to the spec of :func:`softmax_chunk`: two reads of the low-precision
logits and one write, where the eager route widens them into an fp32 buffer and makes five passes
over it). On an H100, one chunk of 5341 × 50304 bf16 logits: 4.55 ms eager, 0.86 through
``torch.compile`` (a reduction and a pointwise kernel; 1.47 with the rows dynamic), 0.56 in the
kernel; the whole loss as in ``CHUNK_BYTES``, 20.5 ms with eager chunks, 8.6 compiled, 8.1 in
the kernel; a compiled llama-base training step 37.9 → 35.4 ms from the compiled chunks to the
kernel (``benchmarks/results/2026-11-27-h100.md``). Not CPUs, where the eager blocks stay in
cache and ``torch.compile`` of the chunk was slower (N=4096, D=256, V=8192, forward and backward:
186 against 204-214 ms fp32, 77 against 85-107 ms bf16). Where the kernel fails to compile, the
loss warns once and goes on with the eager blocks."""

MIXED_ADDMM = {"cuda"}
"""Device types where a low-precision chunk adds its weight gradient straight into the fp32 sum
(``addmm`` with ``out_dtype=float32``: the products in bf16 or fp16, accumulated and written in
fp32 by one kernel) rather than through a low-precision result widened and added (three more
passes over the V×D gradient a chunk, and a rounding of each chunk's share to bf16): the H100
loss of ``CHUNK_BYTES`` 8.8 ms against 9.4, 516 MiB against 737. PyTorch offers it on CUDA only,
in recent versions; where it does not run, the widening route is taken."""

_learnt = {"failed": False, "mixed_addmm": {}}
"""What this process has learnt: whether the fused softmax chunk failed, and by device type
whether the mixed ``addmm`` runs."""


def linear_cross_entropy(
    features_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    bias_V: torch.Tensor | None,
    targets_N: torch.Tensor,
    chunk_rows: int | None = None,
    vocab_multiple: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.cross_entropy(F.linear(features, weight, bias).float(), targets, ignore_index=-100)``,
    the mean over the scored rows, without materialising the logits; and the accuracy, the
    share of scored rows whose target has the highest logit (no gradient).

    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as the plain
    route does. ``chunk_rows`` overrides the chunk size (rows of ``features``) for tests, and
    ``vocab_multiple`` the device's ``VOCAB_MULTIPLE``."""
    if features_ND.dim() != 2 or targets_N.shape != features_ND.shape[:1]:
        raise ValueError(f"features (N, D) and targets (N,) expected, got {tuple(features_ND.shape)} and {tuple(targets_N.shape)}")
    device = features_ND.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else features_ND.dtype
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(device, weight_VD.shape[0], low_precision=compute_dtype.itemsize < 4)
    if vocab_multiple is None:
        vocab_multiple = VOCAB_MULTIPLE.get(device, 1)
    return _LinearCrossEntropy.apply(
        features_ND, weight_VD, bias_V, targets_N, compute_dtype, chunk_rows, vocab_multiple
    )


def default_chunk_rows(device: str, vocab_size: int, low_precision: bool) -> int:
    """Rows per chunk: the device's byte budget of fp32 logits, but never fewer than
    ``MIN_CHUNK_ROWS`` (for the compute precision)."""
    budget_rows = CHUNK_BYTES.get(device, DEFAULT_CHUNK_BYTES) // (4 * vocab_size)
    return max(budget_rows, MIN_CHUNK_ROWS["low" if low_precision else "fp32"])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features_ND, weight_VD, bias_V, targets_N, compute_dtype, chunk_rows, vocab_multiple):
        wants_grad = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_V is not None and ctx.needs_input_grad[2]]
        with torch.autocast(features_ND.device.type, enabled=False):
            loss, accuracy, grads = _chunked(
                features_ND, weight_VD, bias_V, targets_N, compute_dtype, chunk_rows, vocab_multiple, wants_grad
            )
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.has_grad = [g is not None for g in grads]
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, _grad_accuracy):
        """The stored gradients times the incoming one: scaled in place where the graph is freed
        after (nothing else reads them: no fresh buffers, 12 MB a step in the throughput
        benchmark's GPT-2), else into new tensors."""
        in_place = frees_saved_tensors()
        grads = []
        for grad, has in zip(ctx.saved_tensors, ctx.has_grad):
            if not has:
                grads.append(None)
            elif in_place:
                grads.append(grad.mul_(grad_loss.to(grad.dtype)))
            else:
                grads.append(grad * grad_loss.to(grad.dtype))
        return grads[0], grads[1], grads[2], None, None, None, None


def _chunked(features_ND, weight_VD, bias_V, targets_N, compute_dtype, chunk_rows, vocab_multiple, wants_grad):
    """(mean loss, accuracy, [grad of features, weight, bias or None each]) for the loss's gradient 1."""
    N, (V_real, D) = features_ND.shape[0], weight_VD.shape
    V = -(-V_real // vocab_multiple) * vocab_multiple
    scored_N = targets_N != IGNORE_INDEX
    n_scored = scored_N.sum()
    # d(mean loss)/d(logit) = (softmax - onehot) / n_scored on scored rows, 0 on the others.
    softmax_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 for gradcheck
    row_weight_N1 = (scored_N / n_scored.clamp(min=1)).unsqueeze(1).to(softmax_dtype)
    safe_targets_N1 = targets_N.masked_fill(~scored_N, 0).unsqueeze(1)

    x_ND = features_ND.to(compute_dtype)
    if V == V_real:
        w_VD = weight_VD.to(compute_dtype)
        b_V = None if bias_V is None else bias_V.to(compute_dtype)
    else:  # zero rows with a bias of -inf: no probability, no gradient (see VOCAB_MULTIPLE)
        w_VD = x_ND.new_zeros(V, D)
        w_VD[:V_real] = weight_VD
        b_V = x_ND.new_full((V,), float("-inf"))
        b_V[:V_real] = 0.0 if bias_V is None else bias_V
    need_features, need_weight, need_bias = wants_grad
    any_grad = need_features or need_weight or need_bias
    grad_x_ND = torch.empty_like(x_ND) if need_features else None
    # The first chunk writes the weight's gradient, the others add to it (zeros only if none runs).
    new_grad = torch.zeros if N == 0 else torch.empty
    grad_w_VD = new_grad(V, D, dtype=softmax_dtype, device=weight_VD.device) if need_weight else None
    grad_b_V = torch.zeros(V, dtype=softmax_dtype, device=weight_VD.device) if need_bias else None

    rows = max(1, min(chunk_rows, N))
    rows = -(-N // -(-N // rows)) if N else rows  # as many chunks, evened out
    # The softmax and its gradient go through each chunk in blocks that fit in cache (CPU), the
    # matmuls through the whole chunk: many rows amortise the pass each chunk makes over the
    # weight gradient, few rows keep the elementwise passes out of memory.
    block = max(1, min(rows, SOFTMAX_BYTES.get(x_ND.device.type, rows * V * 4) // (4 * V)))
    fused_softmax = fused_softmax_chunk(x_ND.device.type, softmax_dtype)
    logits_buffer = x_ND.new_empty(rows, V)  # the logits, then (overwritten block by block) their gradient
    # The softmax works in place on fp32 logits, else (low precision) in an fp32 buffer per block.
    low_precision = compute_dtype != softmax_dtype
    work_buffer = None
    mixed_addmm = low_precision and _adds_mixed(x_ND.device.type)
    weight_grad_chunk = x_ND.new_empty(V, D) if need_weight and low_precision and not mixed_addmm else None
    # The low-precision chunk's gradient is widened into a buffer of its own before it is added:
    # ``add_`` of mixed dtypes widens into a fresh (V, D) tensor per chunk, whose pages the kernel
    # zero-fills every time (bf16, V=8192, D=256: 3.1 ms a chunk in a training step).
    weight_grad_wide = grad_w_VD.new_empty(V, D) if weight_grad_chunk is not None else None

    # Per row, filled block by block, used once after the loop: the target's logit less the row's
    # highest, and the row's sum of exp(logit - highest).
    shifted_target_N1 = x_ND.new_empty(N, 1, dtype=softmax_dtype)
    sum_exp_N1 = x_ND.new_empty(N, 1, dtype=softmax_dtype)
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        x_nD = x_ND[start:stop]
        logits_nV = logits_buffer[: stop - start]
        if b_V is None:
            torch.mm(x_nD, w_VD.t(), out=logits_nV)
        else:
            torch.addmm(b_V, x_nD, w_VD.t(), out=logits_nV)
        if fused_softmax is not None:  # the whole chunk in one kernel, gradient over the logits
            try:
                shifted_target_N1[start:stop], sum_exp_N1[start:stop] = fused_softmax(
                    logits_nV, safe_targets_N1[start:stop], row_weight_N1[start:stop] if any_grad else None
                )
            except Exception as error:  # noqa: BLE001  (any compiler failure; a real bug raises again below)
                _give_up_fusing(x_ND.device.type, error)
                fused_softmax = None
            else:
                if need_bias:
                    grad_b_V.add_(logits_nV.sum(0, dtype=softmax_dtype))
        if fused_softmax is None:
            if low_precision and work_buffer is None:
                work_buffer = x_ND.new_empty(block, V, dtype=softmax_dtype)
            for first in range(start, stop, block):
                last = min(stop, first + block)
                grad_bV = softmax_block(
                    logits_nV[first - start : last - start],
                    None if work_buffer is None else work_buffer[: last - first],
                    safe_targets_N1[first:last],
                    row_weight_N1[first:last] if any_grad else None,
                    shifted_target_N1[first:last],
                    sum_exp_N1[first:last],
                )
                if need_bias:
                    grad_b_V.add_(grad_bV.sum(0))
        if not any_grad:
            continue
        grad_nV = logits_nV
        if need_features:
            torch.mm(grad_nV, w_VD, out=grad_x_ND[start:stop])
        if need_weight and mixed_addmm:  # low-precision products summed in fp32 by cuBLAS
            torch.addmm(grad_w_VD, grad_nV.t(), x_nD, out_dtype=softmax_dtype, beta=int(start > 0), out=grad_w_VD)
        elif need_weight and weight_grad_chunk is None:  # computed in the gradient's dtype
            if start == 0:
                torch.mm(grad_nV.t(), x_nD, out=grad_w_VD)
            else:
                grad_w_VD.addmm_(grad_nV.t(), x_nD)
        elif need_weight:
            torch.mm(grad_nV.t(), x_nD, out=weight_grad_chunk)
            if start == 0:
                grad_w_VD.copy_(weight_grad_chunk)
            else:
                grad_w_VD.add_(weight_grad_wide.copy_(weight_grad_chunk))

    scored_N1 = scored_N.unsqueeze(1)
    target_logprob_N1 = shifted_target_N1 - sum_exp_N1.log_()
    loss = -(target_logprob_N1 * scored_N1).sum() / n_scored  # nan when nothing is scored, as F.cross_entropy
    accuracy = ((shifted_target_N1 >= 0) & scored_N1).sum() / n_scored.clamp(min=1)  # the target is a top logit
    grads = [
        None if grad_x_ND is None else grad_x_ND.to(features_ND.dtype),
        None if grad_w_VD is None else _unpadded(grad_w_VD, V_real).to(weight_VD.dtype),
        None if grad_b_V is None else _unpadded(grad_b_V, V_real).to(bias_V.dtype),
    ]
    return loss, accuracy, grads


def _unpadded(grad: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of a padded vocabulary's gradient; the tensor itself, not a view of
    it, when there is no padding: autograd adds a later gradient for the same weight (a tied
    embedding's) in place only into one that is not a view."""
    return grad if grad.shape[0] == rows else grad[:rows]


def softmax_block(
    logits_bV: torch.Tensor,
    work_bV: torch.Tensor | None,
    targets_b1: torch.Tensor,
    row_weight_b1: torch.Tensor | None,
    shifted_target_b1: torch.Tensor,
    sum_exp_b1: torch.Tensor,
) -> torch.Tensor | None:
    """The softmax work on one block of logits: into ``shifted_target_b1`` the target's logit less
    the row's highest, into ``sum_exp_b1`` the row's sum of exp(logit - highest), so that the
    target's log-probability is ``shifted_target - log(sum_exp)``; and, given row weights, the
    gradient of the weighted loss, (softmax - one-hot) · weight, written over the logits; it
    returns that gradient in fp32 (the logits themselves or ``work_bV``).

    fp32 logits are worked on in place, others in ``work_bV`` (fp32, the block's shape). One
    exponential per logit and five passes over the block: ``log_softmax`` followed by ``exp`` for
    the softmax took two exponentials and six passes (64 × 8192 fp32 on two cores, in cache:
    225 -> 147 µs)."""
    if work_bV is None:
        work_bV = logits_bV
    else:  # widened first: the max and the shift over low-precision values cost twice as much
        work_bV.copy_(logits_bV)
    row_max_b1 = torch.amax(work_bV, 1, keepdim=True)
    shifted_bV = work_bV.sub_(row_max_b1)
    torch.gather(shifted_bV, 1, targets_b1, out=shifted_target_b1)
    exp_bV = shifted_bV.exp_()
    torch.sum(exp_bV, 1, keepdim=True, out=sum_exp_b1)
    if row_weight_b1 is None:
        return None
    grad_bV = exp_bV.mul_(row_weight_b1 / sum_exp_b1).scatter_add_(1, targets_b1, -row_weight_b1)
    if grad_bV is not logits_bV:
        logits_bV.copy_(grad_bV)  # into the compute dtype, for the matmuls
    return grad_bV


def softmax_chunk(
    logits_nV: torch.Tensor, targets_n1: torch.Tensor, row_weight_n1: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`softmax_block`'s work on a whole chunk of logits, in their own dtype (no fp32 copy),
    as one expression: the spec of ``kernels.triton_loss``. Returns (target's logit less the row's
    highest, row's sum of exp(logit - highest)) and, given row weights, writes (softmax - one-hot)
    · weight over ``logits_nV``."""
    logits = logits_nV.float()  # the same tensor when fp32: read it all before writing over it
    top = logits.amax(1, keepdim=True)
    shifted_target = logits.gather(1, targets_n1) - top
    sum_exp = (logits - top).exp().sum(1, keepdim=True)
    if row_weight_n1 is not None:
        onehot = torch.arange(logits.shape[1], device=logits.device) == targets_n1
        logits_nV.copy_(((logits - top).exp() / sum_exp - onehot.float()) * row_weight_n1)
    return shifted_target, sum_exp


def fused_softmax_chunk(device: str, softmax_dtype: torch.dtype):
    """What does the softmax work of whole chunks on ``device``, called as :func:`softmax_chunk`:
    the Triton kernel (a device in ``TRITON_SOFTMAX``, Triton installed, an fp32 softmax), else
    None for the eager blocks (and once the kernel failed in this process)."""
    if _learnt["failed"] or device not in TRITON_SOFTMAX or softmax_dtype != torch.float32:
        return None
    from scratchlm.kernels import triton_loss  # imports Triton: only for the devices named

    return triton_loss.softmax_rows if triton_loss.AVAILABLE else None


def _give_up_fusing(device: str, error: Exception) -> None:
    """Records that the softmax chunks go on eagerly in this process, and warns once."""
    _learnt["failed"] = True
    first_line = str(error).splitlines()[0] if str(error) else ""
    warnings.warn(
        f"the loss's fused softmax chunk failed on {device} ({type(error).__name__}: {first_line}); "
        "the loss goes on with its eager route",
        stacklevel=2,
    )


def _adds_mixed(device: str) -> bool:
    """Whether ``device`` is in ``MIXED_ADDMM`` and this PyTorch runs its mixed ``addmm`` there
    (tried once per device type on a 2×2 product, written over its own fp32 input)."""
    if device not in MIXED_ADDMM:
        return False
    if device not in _learnt["mixed_addmm"]:
        total = torch.ones(2, 2, device=device)
        half = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        try:
            torch.addmm(total, half, half, out_dtype=torch.float32, out=total)
            works = total.eq(3).all().item()
        except (RuntimeError, TypeError, NotImplementedError):  # no such overload, or not on this device
            works = False
        _learnt["mixed_addmm"][device] = works
    return _learnt["mixed_addmm"][device]


def vocab_cross_entropy(
    model: torch.nn.Module, hidden_ND: torch.Tensor, targets_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) of ``model``'s vocabulary head on hidden states (N, D)
    against targets (N,), -100 unscored: fused when the model exposes ``vocab_projection``
    (features, weight, bias of its last linear layer), else through ``model.logits``."""
    projection = getattr(model, "vocab_projection", None)
    if projection is not None:
        return linear_cross_entropy(*projection(hidden_ND), targets_N)
    logits_NV = model.logits(hidden_ND).float()
    scored_N = targets_N != IGNORE_INDEX
    accuracy = ((logits_NV.detach().argmax(-1) == targets_N) & scored_N).sum() / scored_N.sum().clamp(min=1)
    return F.cross_entropy(logits_NV, targets_N, ignore_index=IGNORE_INDEX), accuracy
