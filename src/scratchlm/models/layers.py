"""Pieces every model family shares: attention masks, self-attention, the MLP, weight init and
the validation of the size fields that every family's config has.

Shape legend (used in comments and name suffixes across ``models/``):

    B  batch size                    T  sequence length
    D  model width (d_model)         H  attention heads
    K  head width (D // H)           F  MLP hidden width (d_ff)
    V  vocabulary size               N  a flat set of selected positions (e.g. masked tokens)
"""

from dataclasses import dataclass, field
import functools
from typing import Literal
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.kernels import compiled, cpu_attention, liger

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # a PyTorch without FlexAttention: document masks stay dense
    BlockMask = create_block_mask = flex_attention = None

FLEX_DEVICES = {"cuda"}
"""Device types on which document masks run through FlexAttention: it skips the blocks a document
mask rules out instead of scoring the whole T×T square. Not on CPU, where it has no backward."""

# --- config validation ---------------------------------------------------------------------------


def check_shared_fields(config) -> None:
    """Validate the fields every family's config has; raise naming the first bad one.

    Field names are given as ``model.arch.<field>``, the way a user sets them on the command line.
    """
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions"):
        check_positive_int(config, name)
    if config.d_model % config.n_heads != 0:
        raise ScratchLMError(
            f"model.arch.d_model={config.d_model} is not divisible by model.arch.n_heads={config.n_heads}; "
            "choose d_model as a multiple of n_heads"
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ScratchLMError(f"model.arch.dropout={config.dropout!r}: must lie in [0, 1)")
    if not config.norm_eps > 0.0:
        raise ScratchLMError(f"model.arch.norm_eps={config.norm_eps!r}: must be positive")


def check_positive_int(config, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScratchLMError(f"model.arch.{name}={value!r}: must be a positive integer")


def check_length(length: int, max_positions: int) -> None:
    """Learned position tables end at ``max_positions``; say so instead of an index error."""
    if length > max_positions:
        raise ScratchLMError(
            f"sequence length {length} exceeds the model's max_positions={max_positions}; "
            "shorten the inputs (data.block_size) or raise model.arch.max_positions"
        )


# --- attention masks -----------------------------------------------------------------------------


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    *,
    causal: bool,
    doc_ids: torch.Tensor | None = None,
    flex: bool = False,
) -> "torch.Tensor | FlexMask | None":
    """One boolean mask for ``scaled_dot_product_attention``: True where a query may attend a key.

    Args:
        attention_mask: (B, T) bool or 0/1 ints, False/0 at padding; None when nothing is padded.
        causal: also forbid attending to later positions.
        doc_ids: (B, T) int document id per token, -1 at padding (as ``data.packing`` emits). When
            given, a token attends only to tokens of its own document (block-diagonal attention for
            packed sequences), and tokens with id -1 count as padding.
        flex: with ``doc_ids`` on a device in ``FLEX_DEVICES``, return a :class:`FlexMask` for
            :func:`attend` to run through FlexAttention (the caller must attend with ``attend``).

    Returns:
        (B, 1, T, T) bool, broadcast over heads; or None when neither ``attention_mask`` nor
        ``doc_ids`` is given, in which case the caller passes ``is_causal=causal`` to SDPA and gets
        its fused causal kernels. Callers that know a batch has no padding should pass None for the
        same reason: any explicit mask rules out the flash kernel on GPU.

    Every position may always attend to itself, even a padding position. Without that, a padding
    query in a causal model (or any query of an all-padding row) has every key masked, and
    depending on the PyTorch version and kernel SDPA returns NaN for it (pytorch/pytorch#103749;
    newer kernels return zeros, not all of them do). That output is never used, yet NaN still
    leaks: losses skip such positions by multiplying by 0, and ``0 * NaN`` is NaN, in the forward
    sum and again in the backward pass, which poisons every gradient. Real tokens never attend to
    padding, so the outputs that matter are unchanged.
    """
    if attention_mask is None and doc_ids is None:
        return None
    if flex and doc_ids is not None and flex_available(doc_ids.device):
        return FlexMask(attention_mask, doc_ids, causal)
    reference = attention_mask if attention_mask is not None else doc_ids
    batch, length = reference.shape
    device = reference.device
    real_BT = torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        real_BT = real_BT & attention_mask.bool()
    if doc_ids is not None:
        real_BT = real_BT & (doc_ids >= 0)

    allowed = real_BT[:, None, None, :]  # (B, 1, 1, T): keys that are real tokens
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T): query doc == key doc
        allowed = allowed & same_doc[:, None]  # (B, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=device)
    return allowed | diagonal  # (B, 1, T, T)


def flex_available(device: torch.device) -> bool:
    return flex_attention is not None and device.type in FLEX_DEVICES and not _flex_state["failed"]


_flex_state = {"compiled": None, "failed": False}


@dataclass
class FlexMask:
    """A document mask for FlexAttention; it keeps its inputs so that :func:`attend` can fall back
    to the dense mask of :func:`build_attention_mask` (same rule, same self-attending diagonal)."""

    attention_mask: torch.Tensor | None
    doc_ids: torch.Tensor
    causal: bool
    _block_mask: "BlockMask | None" = field(default=None, init=False, repr=False, compare=False)

    def block_mask(self):
        """The FlexAttention ``BlockMask``: which (query, key) pairs may meet, by the rule of
        :func:`build_attention_mask`. Built on the first call and kept: every layer of a forward
        pass shares one mask."""
        if self._block_mask is None:
            self._block_mask = self._build_block_mask(compiled=self.doc_ids.is_cuda)
        return self._block_mask

    def _build_block_mask(self, compiled: bool):
        """``compiled``: build it through ``torch.compile``, one fused pass instead of eager ops
        over every (batch, query, key) triple; the same mask (tested), for a new batch every step
        without recompiling. On GPUs, where FlexAttention is compiled anyway. For 16 blocks of 1024
        tokens, 4 documents each, on two CPU cores: 55-70 ms eager, 8-10 ms compiled (after a
        first build of 4-7 s that compiles); on a GPU ``benchmarks/kernels.py`` times both."""
        doc_ids, causal = self.doc_ids, self.causal
        real_BT = doc_ids >= 0
        if self.attention_mask is not None:
            real_BT = real_BT & self.attention_mask.bool()

        def allowed(b, h, q, k):
            keep = (doc_ids[b, q] == doc_ids[b, k]) & real_BT[b, k]
            if causal:
                keep = keep & (k <= q)
            return keep | (q == k)

        B, T = doc_ids.shape
        build = _compiled_create_block_mask() if compiled else create_block_mask
        return build(allowed, B, None, T, T, device=doc_ids.device)

    def dense(self) -> torch.Tensor:
        return build_attention_mask(self.attention_mask, causal=self.causal, doc_ids=self.doc_ids)


@functools.cache
def _compiled_create_block_mask():
    return torch.compile(create_block_mask)


def attend(
    q_BHTK: torch.Tensor,
    k_BGTK: torch.Tensor,
    v_BGTK: torch.Tensor,
    mask: "torch.Tensor | FlexMask | None",
    *,
    dropout_p: float,
    causal: bool,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention of queries (B, H, T, K) over keys and values (B, G, T, K) -> (B, H, T, K).

    A :class:`FlexMask` runs through compiled FlexAttention (no attention dropout there: with
    dropout on, the dense mask and SDPA are used). Should FlexAttention fail (a compiler missing,
    an unsupported GPU), one warning is given and every later call uses SDPA with the dense mask.
    Anything else goes to ``scaled_dot_product_attention`` (``is_causal`` when there is no mask,
    so its fused causal kernels run).
    """
    if isinstance(mask, FlexMask):
        if dropout_p == 0.0 and not _flex_state["failed"]:
            try:
                if _flex_state["compiled"] is None:
                    _flex_state["compiled"] = torch.compile(flex_attention, dynamic=False)
                flex = _flex_state["compiled"]
                return flex(q_BHTK, k_BGTK, v_BGTK, block_mask=mask.block_mask(), enable_gqa=enable_gqa)
            except Exception as error:  # noqa: BLE001  (any compiler or kernel failure)
                _flex_state["failed"] = True
                warnings.warn(
                    f"FlexAttention failed ({type(error).__name__}); document masks use SDPA with a dense mask",
                    stacklevel=2,
                )
        mask = mask.dense()
    return sdpa(
        q_BHTK, k_BGTK, v_BGTK, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None,
        enable_gqa=enable_gqa,
    )


CPU_BF16_MATMUL_MAX_QUERIES = 256
"""Up to this many queries, bf16 attention on CPU (eager) runs as batched matmuls with a
written-out backward (:func:`matmul_attention`: fp32 scores and softmax, bf16 probabilities
kept for backward). PyTorch's fused CPU kernel cuts the queries into blocks of 32 below 192 of
them (64 from there, 256 from 768), and in bf16 each block costs more than the arithmetic it
saves. Forward and backward over 4096 tokens, 4 causal heads of 64, two cores, against the fused
kernel in fp32 (casts included) and in bf16: 64 queries 7.3 ms against 13.0 and 27.9; 128: 9.8,
17.3, 31.6; 256: 16.0, 23.4, 22.9; 384: 21.0, 30.9, 23.5; 512: 41.0, 41.0, 31.8 (the fused bf16
kernel from there, which also keeps no probabilities). In fp32 the two routes are even."""

CPU_BF16_MIN_QUERIES = 192
"""Under ``torch.compile``, where the matmul route is not taken: below this many queries, bf16
attention on CPU computes in fp32 (the fused kernel in fp32: 20 ms against 39 in bf16 for
forward and backward of 32×4 heads of width 64 at 128 queries; even at 192)."""


def sdpa(q_BHQK: torch.Tensor, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (same arguments, same result dtype), with CPU routes
    for what PyTorch's fused CPU kernel does slowly or not at all: causal fp32 without a mask or
    dropout runs :mod:`scratchlm.kernels.cpu_attention` where that applies (short sequences);
    bf16 over up to ``CPU_BF16_MATMUL_MAX_QUERIES`` queries, and fp32 with dropout (the fused
    kernel has none, and its unfused fallback is slower), run :func:`matmul_attention` when not under
    ``torch.compile``; compiled, bf16 with fewer than ``CPU_BF16_MIN_QUERIES`` queries computes in
    fp32 (autocast, which would cast the inputs back to bf16, is off for that call)."""
    if q_BHQK.device.type != "cpu":
        return F.scaled_dot_product_attention(q_BHQK, k_BGTK, v_BGTK, **kwargs)
    mask, dropout_p = kwargs.get("attn_mask"), kwargs.get("dropout_p", 0.0)
    plain_causal = kwargs.get("is_causal", False) and mask is None and dropout_p == 0.0
    if plain_causal and cpu_attention.applies(q_BHQK, k_BGTK, v_BGTK):
        return cpu_attention.attention(q_BHQK, k_BGTK, v_BGTK, True, kwargs.get("scale"))
    dtypes = {q_BHQK.dtype, k_BGTK.dtype, v_BGTK.dtype}
    queries = q_BHQK.shape[-2]
    short_bf16 = dtypes == {torch.bfloat16} and queries <= CPU_BF16_MATMUL_MAX_QUERIES
    fp32_dropout = dtypes == {torch.float32} and dropout_p > 0.0
    if (short_bf16 or fp32_dropout) and not torch.compiler.is_compiling():
        with torch.autocast("cpu", enabled=False):
            return matmul_attention(q_BHQK, k_BGTK, v_BGTK, **kwargs)
    if q_BHQK.dtype == torch.bfloat16 and queries < CPU_BF16_MIN_QUERIES:
        if mask is not None and mask.is_floating_point():
            kwargs["attn_mask"] = mask.float()  # an additive bias (T5's positions) in the scores' dtype
        with torch.autocast("cpu", enabled=False):
            y = sdpa(q_BHQK.float(), k_BGTK.float(), v_BGTK.float(), **kwargs)
        return y.to(q_BHQK.dtype)
    return F.scaled_dot_product_attention(q_BHQK, k_BGTK, v_BGTK, **kwargs)


def matmul_attention(
    q_BHQK: torch.Tensor,
    k_BGTK: torch.Tensor,
    v_BGTK: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as batched matmuls, with a backward written out.

    Each group of query heads that shares a key/value head is one batch of the matmuls (no copy of
    keys and values per head). The attention probabilities (B, H, Q, T) are kept for backward,
    as in the unfused route; dropout draws its mask with :func:`keep_mask`. ``attn_mask`` is a
    boolean mask (True: may attend) or an additive float bias, which gets its gradient (T5's
    learned position bias). ``is_causal`` aligns the triangle at the top left, as SDPA does.
    ``enable_gqa`` is implied by the shapes."""
    del enable_gqa
    scale = q_BHQK.shape[-1] ** -0.5 if scale is None else scale
    return _MatmulAttention.apply(q_BHQK, k_BGTK, v_BGTK, attn_mask, is_causal, scale, dropout_p)


class _MatmulAttention(torch.autograd.Function):
    """The scores and their softmax are computed in fp32 whatever the inputs' dtype (bf16 keeps 8
    bits of a score: on one of 8 that moves its probability by up to 3%), so the scores' matmul
    takes fp32 copies of queries and keys, as a fused kernel accumulates in fp32. The
    probabilities are then kept in the inputs' dtype, in which they meet the values and the
    backward runs (ATen's softmax backward computes in fp32 inside), as in a fused kernel. With
    fp32 inputs every cast is a no-op."""

    @staticmethod
    def forward(ctx, q_BHQK, k_BGTK, v_BGTK, mask, causal, scale, dropout_p):
        B, H, Q, K = q_BHQK.shape
        G, T = k_BGTK.shape[1:3]
        # (B·G, R·Q, K): the R = H/G query heads of a group, one after another, share its keys.
        q_bRK, k_bTK, v_bTK = q_BHQK.reshape(B * G, -1, K), k_BGTK.reshape(B * G, T, K), v_BGTK.reshape(B * G, T, K)
        wide = torch.promote_types(q_bRK.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        q32_bRK, k32_bTK = q_bRK.to(wide), k_bTK.to(wide)
        if causal:
            bias_QT = q32_bRK.new_full((Q, T), float("-inf")).triu_(1)
            scores_bRT = torch.baddbmm(bias_QT.repeat(H // G, 1), q32_bRK, k32_bTK.transpose(1, 2), alpha=scale)
        else:
            scores_bRT = torch.bmm(q32_bRK, k32_bTK.transpose(1, 2)).mul_(scale)
        del q32_bRK, k32_bTK
        scores_BHQT = scores_bRT.view(B, H, Q, T)
        if mask is not None and mask.dtype == torch.bool:
            scores_BHQT.masked_fill_(~mask, float("-inf"))
        elif mask is not None:
            scores_BHQT.add_(mask)
        probs_bRT = torch.ops.aten._softmax.out(scores_bRT, -1, False, out=scores_bRT).to(v_bTK.dtype)
        keep = keep_mask(probs_bRT.shape, dropout_p, probs_bRT.device) if dropout_p > 0.0 else None
        out_bRK = torch.bmm(probs_bRT if keep is None else _masked_scale(probs_bRT, keep, dropout_p), v_bTK)
        ctx.save_for_backward(q_bRK, k_bTK, v_bTK, probs_bRT, keep)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.mask_shape = None if mask is None or mask.dtype == torch.bool else mask.shape
        return out_bRK.view(B, H, Q, K)

    @staticmethod
    def backward(ctx, grad_out_BHQK):
        """With A the (dropped-out) probabilities and O = A·V: grad V = Aᵀ·grad O; grad A =
        grad O·Vᵀ (times the dropout mask and scale: grad P); grad scores = P ∘ (grad P − Σ_rows
        P ∘ grad P), the softmax backward; grad Q = scale · grad scores · K, grad K = scale ·
        grad scoresᵀ · Q."""
        q_bRK, k_bTK, v_bTK, probs_bRT, keep = ctx.saved_tensors
        B, H, Q, K = grad_out_BHQK.shape
        G, T = k_bTK.shape[0] // B, k_bTK.shape[1]
        grad_out_bRK = grad_out_BHQK.to(v_bTK.dtype).reshape(-1, H // G * Q, K)
        used_bRT = probs_bRT if keep is None else _masked_scale(probs_bRT, keep, ctx.dropout_p)
        grad_v_bTK = torch.bmm(used_bRT.transpose(1, 2), grad_out_bRK)
        del used_bRT
        grad_bRT = torch.bmm(grad_out_bRK, v_bTK.transpose(1, 2))
        if keep is not None:
            grad_bRT = _masked_scale(grad_bRT, keep, ctx.dropout_p)
        grad_scores_bRT = torch._softmax_backward_data(grad_bRT, probs_bRT, -1, probs_bRT.dtype)
        grad_q_bRK = torch.bmm(grad_scores_bRT, k_bTK).mul_(ctx.scale)
        grad_k_bTK = torch.bmm(grad_scores_bRT.transpose(1, 2), q_bRK).mul_(ctx.scale)
        grad_mask = None
        if ctx.mask_shape is not None and ctx.needs_input_grad[3]:
            grad_mask = grad_scores_bRT.view(B, H, Q, T).sum_to_size(ctx.mask_shape)
        return (
            grad_q_bRK.view(B, H, Q, K), grad_k_bTK.view(B, G, T, K), grad_v_bTK.view(B, G, T, K),
            grad_mask, None, None, None,
        )


# --- dropout -------------------------------------------------------------------------------------


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, device: torch.device | str) -> torch.Tensor:
    """A boolean dropout mask: True (keep) with probability 1 - p, from torch's default generator.

    Uniform floats against p: on CPU a third cheaper than the ``bernoulli_`` that PyTorch's
    dropout draws with (64 × 128 × 128 entries on two cores: 3.5 against 5.5 ms). Not random
    integers against a threshold, cheaper again (2.4 ms, 1.5 with two entries per integer): masks
    drawn that way passed tests of rate, independence and autocorrelation, yet trained the
    quickstart's GPT-2 to held-out losses of 5.78-6.12 at 200 steps in five runs, against
    5.50-5.72 over four seeds with ``bernoulli_`` and 5.48 with these (800 steps: 5.35 against 4.91
    and 4.90)."""
    return torch.rand(shape, device=device) >= p


def _masked_scale(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x · keep / (1 - p). The mask is read as uint8: with a bool operand ``mul`` first copies it
    into x's dtype (0.64 against 0.40 ms for 64 × 128 × 128 values on two cores)."""
    return torch.mul(x, keep.view(torch.uint8)).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same module), with its mask from :func:`keep_mask` on CPU.

    In training with dropout 0.1 (the GPT-2 and BERT presets), PyTorch's CPU dropout took a third
    of the tiny GPT-2's step, most of it drawing masks. Same generator, other draws: a seed gives
    other masks than ``nn.Dropout``'s, equally random. Elsewhere (GPUs, under ``torch.compile``)
    ``F.dropout`` runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p == 1.0 or self.inplace or torch.compiler.is_compiling():
            return F.dropout(x, self.p, True, self.inplace)
        return _Dropout.apply(x, self.p)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.p = p
        return _masked_scale(x, keep, p)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _masked_scale(grad, keep, ctx.p), None


def _cpu_fp32_eager(*tensors: torch.Tensor) -> bool:
    """Whether the hand-written CPU routes below take these tensors: every one fp32 on CPU, and
    not under ``torch.compile`` (which fuses the plain formulas itself)."""
    return not torch.compiler.is_compiling() and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors
    )


# --- normalisation -------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (Zhang & Sennrich 2019): ``nn.RMSNorm``'s
    parameters and results, with a faster CPU route in fp32.

    PyTorch's CPU ``rms_norm`` has no fused backward: under autograd it runs as a composite of
    ops that keeps and re-reads their intermediates. On CPU in fp32, eagerly, this norm runs as
    two compiled kernels (``kernels.compiled.rms_norm_kernels``: one loop over the rows forward,
    one backward that also sums the weight's gradient; the input is kept, not x̂), or, for inputs
    too small to pay for compiling, as the eager ops of ``_RMSNorm`` (the mean of squares, as
    ``nn.RMSNorm`` and Hugging Face's norms take it, and two multiplies forward; five passes with
    one temporary backward). Forward and backward of (32, 128, 256) through autograd, inputs from
    memory, two cores: compiled 3.8-4.0 ms, eager ops 5.7-5.9 ms, PyTorch's
    composite 9.6-11.6 ms. Elsewhere ``F.rms_norm`` runs: on CUDA it is one fused kernel each way
    (forward and backward of (16384, 768) fp32 on an H200: 0.17-0.20 ms against 0.53-0.65 ms for
    the eager ops; ``benchmarks/kernels.py``); so it does under ``torch.compile`` (the compiler
    fuses it) and for inputs that are not fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _cpu_fp32_eager(x, self.weight):
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return _RMSNorm.apply(x, self.weight, self.eps, compiled.rms_norm_kernels(x, self.eps))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _RMSNorm(torch.autograd.Function):
    """The norm's two routes: the compiled kernels (``kernels``, one loop each way over rows of
    the input, which is kept), or the eager ops below, which keep x̂ instead."""

    @staticmethod
    def forward(ctx, x, weight, eps, kernels):
        ctx.backward_kernel = None if kernels is None else kernels[1]
        if kernels is not None:
            x_ND = x.reshape(-1, x.shape[-1]).contiguous()
            y_ND, rstd_N1 = kernels[0](x_ND, weight, eps)
            ctx.save_for_backward(x_ND, weight, rstd_N1)
            return y_ND.view(x.shape)
        rstd = x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        x_hat = x * rstd
        # x̂ is kept instead of x (the same size; x itself is then free once the residual add has
        # read it): the backward starts from it instead of remaking it.
        ctx.save_for_backward(x_hat, weight, rstd)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad_y):
        """With x̂ = x·rstd: grad_weight = Σ grad_y·x̂ over every position, and grad_x =
        rstd·(grad_y·weight − x̂·m/D) where m = Σ_d grad_y·weight·x̂ per position, the one product
        ``grad_y·x̂`` matrix-times-weight: five passes over (N, D) and one temporary."""
        if ctx.backward_kernel is not None:
            x_ND, weight, rstd_N1 = ctx.saved_tensors
            grad_x_ND, grad_weight = ctx.backward_kernel(grad_y.reshape(x_ND.shape).contiguous(), x_ND, weight, rstd_N1)
            grad_x = grad_x_ND.view(grad_y.shape) if ctx.needs_input_grad[0] else None
            return grad_x, grad_weight if ctx.needs_input_grad[1] else None, None, None
        x_hat, weight, rstd = ctx.saved_tensors
        D = x_hat.shape[-1]
        scratch = grad_y * x_hat
        scratch_ND = scratch.reshape(-1, D)
        grad_weight = scratch_ND.sum(0) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None, None
        m = torch.mv(scratch_ND, weight).view(rstd.shape).mul_(rstd).div_(-D)
        correction = torch.mul(x_hat, m, out=scratch)  # −x̂·rstd·m/D, over the spent product
        return torch.mul(grad_y, weight).mul_(rstd).add_(correction), grad_weight, None, None


# --- GELU ----------------------------------------------------------------------------------------


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: Literal["none", "tanh"]
) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate=...)``. The tanh form runs, on CPU in fp32
    or under bf16 autocast, eagerly and for outputs large enough to pay back the compiling, as a
    matmul and one compiled kernel that adds the bias, applies GELU and keeps GELU's slope for the
    backward, which is then one multiply (``kernels.compiled``: no pass for the bias, and 2.3x
    faster than ATen's tanh GELU on data in cache)."""
    rows = x.numel() // x.shape[-1]
    if (route := _bias_gelu_tanh_route(approximate, rows, weight.shape[0], x, weight, bias)) is not None:
        kernels, dtype = route
        if bias is None:
            bias = torch.zeros(weight.shape[0], device=x.device)
        # Under autocast the matmul takes the autocast dtype, as F.linear's would; the bias stays
        # fp32 and is added in the kernel's fp32 arithmetic.
        return _LinearBiasGeluTanh.apply(x.to(dtype), weight.to(dtype), bias, kernels)
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


class LinearGELU(nn.Linear):
    """``nn.Linear`` followed by GELU as one module (the state dict keeps ``weight`` and ``bias``),
    whose forward is :func:`linear_gelu`; hooks on it see it run."""

    def __init__(self, in_features: int, out_features: int, approximate: Literal["none", "tanh"]) -> None:
        super().__init__(in_features, out_features)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.weight, self.bias, self.approximate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approximate={self.approximate}"


def gelu(x: torch.Tensor, approximate: Literal["none", "tanh"] = "none") -> torch.Tensor:
    """``F.gelu(x, approximate=...)``, the tanh form through the compiled kernels where
    :func:`linear_gelu` takes them."""
    width = x.shape[-1]
    if (route := _bias_gelu_tanh_route(approximate, x.numel() // max(width, 1), width, x)) is not None:
        kernels, dtype = route
        return _LinearBiasGeluTanh.apply(x.to(dtype), None, torch.zeros(width, device=x.device), kernels)
    return F.gelu(x, approximate=approximate)


def _bias_gelu_tanh_route(
    approximate: str,
    rows: int,
    width: int,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[tuple, torch.dtype] | None:
    """(the compiled kernels, the dtype they take the pre-activation in) where they apply: tanh
    form, CPU, eager, a pre-activation of (rows, width) large enough
    (``kernels.compiled.MIN_ELEMENTS``), and either every tensor fp32 without autocast or fp32
    parameters under bf16 autocast (the pre-activation then bf16, as autocast's matmul gives it).
    Without a weight, ``x`` is the pre-activation, and the kernels are compiled for its layout."""
    if approximate != "tanh" or torch.compiler.is_compiling():
        return None
    params = [t for t in (weight, bias) if t is not None]
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16 or not _cpu_fp32_eager(*params) or x.dtype not in (torch.float32, dtype):
            return None
    elif _cpu_fp32_eager(x, *params):
        dtype = torch.float32
    else:
        return None
    kernels = compiled.bias_gelu_tanh_kernels(rows, width, dtype, x.device, x if weight is None else None)
    return None if kernels is None else (kernels, dtype)


def frees_saved_tensors() -> bool:
    """Inside a backward: whether the graph's saved tensors are freed after it (``backward()``
    without ``retain_graph``), so that a backward may write its gradient over an activation it
    alone saved (one fresh buffer fewer: a 16 MB MLP activation of the throughput benchmark,
    whose fresh pages the kernel zero-fills when the allocator has handed them back). False
    where PyTorch does not tell (the query is the one its own compiled backward asks)."""
    keeps_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keeps_graph is not None and not keeps_graph()


class _LinearBiasGeluTanh(torch.autograd.Function):
    """``gelu_tanh(x @ weight.T + bias)``, or ``gelu_tanh(x + bias)`` without a weight; ``x`` and
    ``weight`` in one dtype (fp32 or bf16), ``bias`` fp32. With a weight the pre-activation is
    this function's own: the forward kernel writes GELU's slope over it, and the backward is
    that slope times the incoming gradient, written over the slope where the graph is freed
    after (:func:`frees_saved_tensors`). Without one, ``x`` is the caller's and is kept; the
    backward kernel computes the slope from it."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        forward, backward, forward_ = kernels
        x_ND = x.reshape(-1, x.shape[-1])
        if weight is None:
            y_NF = forward(x_ND, bias)
            ctx.backward_kernel = backward
            ctx.save_for_backward(x_ND, weight, x_ND, bias)  # the pre-activation is x itself
        else:
            h_NF = torch.mm(x_ND, weight.t())
            y_NF = forward_(h_NF, bias)
            ctx.backward_kernel = None
            ctx.save_for_backward(x_ND, weight, h_NF, bias)  # h_NF now holds the slope
        return y_NF.view(*x.shape[:-1], y_NF.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x_ND, weight, saved_NF, bias = ctx.saved_tensors
        grad_NF = grad_y.reshape(saved_NF.shape).to(saved_NF.dtype)
        if ctx.backward_kernel is not None:  # saved_NF is the pre-activation
            grad_h_NF = ctx.backward_kernel(grad_NF, saved_NF, bias)
        elif frees_saved_tensors():
            grad_h_NF = torch.mul(grad_NF, saved_NF, out=saved_NF)
        else:
            grad_h_NF = grad_NF * saved_NF
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x_ND = grad_h_NF if weight is None else torch.mm(grad_h_NF, weight)
            grad_x = grad_x_ND.view(*grad_y.shape[:-1], x_ND.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_h_NF.t(), x_ND)
        if ctx.needs_input_grad[2]:
            # Summed in the pre-activation's dtype, as F.linear's under autocast: sum(dtype=fp32)
            # of bf16 converts the whole tensor first (3.4 ms for (4096, 1024)).
            grad_bias = grad_h_NF.sum(0).to(bias.dtype)
        return grad_x, grad_weight, grad_bias, None


# --- gated MLP activations ----------------------------------------------------------------------

GATE_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
"""The branch activations of gated MLPs: SiLU (SwiGLU, Llama), exact GELU (GeGLU, ModernBERT)."""

IN_PLACE_ACTIVATIONS = {"silu": torch.ops.aten.silu.out, "gelu": torch.ops.aten.gelu.out}
"""The same activations as ``out=`` ops, which may write over their input (``_Gated`` does)."""


def gated(h_BT2F: torch.Tensor, activation: Literal["silu", "gelu"]) -> torch.Tensor:
    """``act(a) * b`` for ``a, b = h.chunk(2, dim=-1)``, the middle of a gated MLP whose two input
    projections are one fused matmul: (..., 2F) -> (..., F).

    Through autograd the chunk's backward concatenates the two halves' gradients into a fresh
    (..., 2F) tensor, one more pass over it; here the backward writes each half's gradient into
    its place of one buffer. Under ``torch.compile`` the plain formula runs (the compiler fuses it).
    SwiGLU on CUDA runs Liger-Kernel's fused kernel when it is installed (``kernels.liger``)."""
    if torch.compiler.is_compiling():
        a, b = h_BT2F.chunk(2, dim=-1)
        return GATE_ACTIVATIONS[activation](a) * b
    if activation == "silu" and (kernel := liger.swiglu_kernel(h_BT2F.device)) is not None:
        return kernel(h_BT2F)
    return _Gated.apply(h_BT2F, activation)


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, activation):
        ctx.activation = activation
        h_N2F = h.reshape(-1, h.shape[-1])
        a, b = h_N2F.chunk(2, dim=-1)
        if (kernels := compiled.gated_kernels(a, b, activation)) is not None:
            ctx.save_for_backward(h)
            ctx.backward_kernel = kernels[1]
            return kernels[0](a, b, activation).view(*h.shape[:-1], -1)
        ctx.backward_kernel = None
        # Unary kernels read a strided half 2-3x slower than a copy of it costs (GELU on
        # (32, 128, 688): 2.4 ms strided, 0.5 + 0.9 ms copied); products don't care. The
        # activation then runs in place on the copy: one fresh buffer fewer.
        act_a = a.contiguous()
        IN_PLACE_ACTIVATIONS[activation](act_a, out=act_a)
        ctx.save_for_backward(h, act_a)
        return (act_a * b).view(*h.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        """grad_a = act'(a)·(grad_y·b), grad_b = grad_y·act(a), each into its half of one buffer."""
        if ctx.backward_kernel is not None:
            (h,) = ctx.saved_tensors
            a, b = h.reshape(-1, h.shape[-1]).chunk(2, dim=-1)
            grad_N2F = ctx.backward_kernel(grad_y.reshape(a.shape).to(h.dtype), a, b, ctx.activation)
            return grad_N2F.view(h.shape), None
        h, act_a = ctx.saved_tensors
        a, b = h.reshape(-1, h.shape[-1]).chunk(2, dim=-1)
        grad_NF = grad_y.reshape(a.shape)
        grad_h = torch.empty_like(h)
        grad_a, grad_b = grad_h.view(-1, h.shape[-1]).chunk(2, dim=-1)
        torch.mul(grad_NF, act_a, out=grad_b)
        torch.mul(grad_NF, b, out=grad_a)  # then act'(a) applied in place: no temporary
        if ctx.activation == "silu":
            torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
        else:
            torch.ops.aten.gelu_backward.grad_input(grad_a, a, grad_input=grad_a)
        return grad_h, None


def gated_linear(x_BTD: torch.Tensor, weight_2FD: torch.Tensor, activation: Literal["silu", "gelu"]) -> torch.Tensor:
    """``gated(F.linear(x, weight), activation)``: a gated MLP's fused input projection (no bias)
    and its gate, (..., D) -> (..., F).

    On CPU in fp32 the two halves of the weight run as two matmuls into two contiguous outputs:
    the elementwise work then reads no strided halves and copies none (forward and backward of
    the throughput benchmark's SwiGLU, (4096, 256) -> (4096, 688), inputs from memory, two cores:
    41.4-42.1 ms against 44.1-45.4 through the one fused matmul, ``benchmarks/cpu_kernels.py``;
    the gate as a compiled kernel was no faster). Elsewhere (CUDA, bf16 autocast, under
    ``torch.compile``) the one matmul and :func:`gated` run."""
    if not _cpu_fp32_eager(x_BTD, weight_2FD) or torch.is_autocast_enabled("cpu"):
        return gated(F.linear(x_BTD, weight_2FD), activation)
    return _GatedLinear.apply(x_BTD, weight_2FD, activation)


class _GatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, activation):
        x_ND = x.reshape(-1, x.shape[-1])
        weight_a, weight_b = weight.chunk(2)
        a, b = torch.mm(x_ND, weight_a.t()), torch.mm(x_ND, weight_b.t())
        ctx.activation = activation
        if (kernels := compiled.gated_kernels(a, b, activation)) is not None:
            ctx.backward_kernels = kernels[1:]
            ctx.save_for_backward(x_ND, weight, a, b)
            y = kernels[0](a, b, activation)
        else:
            ctx.backward_kernels = None
            act_a = GATE_ACTIVATIONS[activation](a)
            ctx.save_for_backward(x_ND, weight, a, b, act_a)
            y = act_a * b
        return y.view(*x.shape[:-1], b.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        """grad_a = act'(a)·(grad_y·b), grad_b = grad_y·act(a) (written over ``a`` and ``b``, this
        function's own, where the graph is freed after: :func:`frees_saved_tensors`); then the
        matmuls' gradients, each half of the weight's gradient written in its place."""
        x_ND, weight, a, b, *act = ctx.saved_tensors
        weight_a, weight_b = weight.chunk(2)
        grad_NF = grad_y.reshape(-1, b.shape[-1])
        if ctx.backward_kernels is not None and frees_saved_tensors():
            ctx.backward_kernels[1](grad_NF, a, b, ctx.activation)
            grad_a, grad_b = a, b
        elif ctx.backward_kernels is not None:
            grad_a, grad_b = ctx.backward_kernels[0](grad_NF, a, b, ctx.activation)
        else:
            grad_b = grad_NF * act[0]
            grad_a = torch.mul(grad_NF, b)
            if ctx.activation == "silu":
                torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
            else:
                torch.ops.aten.gelu_backward.grad_input(grad_a, a, grad_input=grad_a)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_a, weight_a).addmm_(grad_b, weight_b).view(*grad_y.shape[:-1], -1)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            grad_weight_a, grad_weight_b = grad_weight.chunk(2)
            torch.mm(grad_a.t(), x_ND, out=grad_weight_a)
            torch.mm(grad_b.t(), x_ND, out=grad_weight_b)
        return grad_x, grad_weight, None


class GatedLinear(nn.Linear):
    """A gated MLP's fused input projection and its gate as one module: ``nn.Linear(D, 2F,
    bias=False)``'s parameter (the state dict's ``weight``, rows [0, F) the activated half) whose
    forward is :func:`gated_linear`, (..., D) -> (..., F). A module, not a bare function of the
    weight, so that hooks on it (the FLOP count's, a user's) see it run."""

    def __init__(self, in_features: int, out_features: int, activation: Literal["silu", "gelu"]) -> None:
        super().__init__(in_features, 2 * out_features, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_linear(x, self.weight, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


# --- rotary position embeddings ------------------------------------------------------------------


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of rotary embeddings (Su et al. 2021, RoFormer §3.4) for ``positions``.

    Never traced: in a compiled model the call is a graph break, so the tables reach the
    compiled blocks as inputs. Traced, they are pointwise functions of an ``arange``, which
    Inductor recomputes inside every kernel that reads them (a power, a cosine and a sine per
    element of every query and key, forward and backward: its rotary kernels took 4.9 ms of a
    45 ms llama-base step on an H100, where HF's, reading the angles from a matmul, took 1.4).
    Call it before anything else the forward computes, so that the graph before the break holds
    only the positions. (``torch.compiler.disable`` is applied at the call, not as a decorator:
    it imports the compiler, 1.7 s, which an uncompiled model never needs.)

    Args:
        positions: (T,) or (B, T) integer positions; (B, T) lets positions restart per document.
        head_dim: K, even.
        theta: the base of the frequencies: pair j rotates by position · theta^(-2j/K).

    Returns:
        cos, sin of shape (..., T, K) in the layout Hugging Face uses ("rotate half"): the K/2
        frequencies repeated twice, so dimension i pairs with i + K/2, not with i + 1.
        Computed in fp32 (positions × frequencies loses precision in bf16), cast to ``dtype``.
    """
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_rope_tables)(positions, head_dim, theta, dtype)
    return _rope_tables(positions, head_dim, theta, dtype)


def _rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., T, K/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, K)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x_BHTK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, H, T, K) by cos/sin of shape (T, K) or (B, T, K), as
    ``rope_cos_sin`` lays them out; the result has the dtype ``x * cos`` would have."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, K): broadcast over heads
    if torch.compiler.is_compiling():  # the compiler fuses the plain formula into one kernel
        first, second = x_BHTK.chunk(2, dim=-1)
        return x_BHTK * cos + torch.cat([-second, first], dim=-1) * sin
    return _Rotary.apply(x_BHTK, cos, sin)


class _Rotary(torch.autograd.Function):
    """Eager RoPE in three passes per direction, with no temporaries: ``x * cos +
    rotate_half(x) * sin`` spelled out on the two halves. The rotation is orthogonal, so the
    gradient is the same rotation by the opposite angle."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin, sin_sign=1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sin_sign=-1.0).to(ctx.x_dtype), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sin_sign: float) -> torch.Tensor:
    """(x1·c − s·x2·sin, x2·c + s·x1·sin) on the halves x1, x2 of the last dimension (s = sin_sign);
    cos/sin hold each frequency twice (``rope_cos_sin``), so their first halves suffice."""
    out = torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=torch.result_type(x, cos), device=x.device)
    return _rotate_into(out, x, cos, sin, sin_sign)


def _rotate_into(
    out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sin_sign: float
) -> torch.Tensor:
    """:func:`_rotate` written into ``out``, which may be a strided view: ``x·cos`` over the whole
    width, then each half's sine term added in place (three passes; four, two per half, took
    1.6 ms where these take 1.3 for (32, 128, 8, 64) on two cores)."""
    half = x.shape[-1] // 2
    sin_half = sin[..., :half]
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin_half, value=-sin_sign)
    out[..., half:].addcmul_(x[..., :half], sin_half, value=sin_sign)
    return out


def rotary_split_heads(
    packed_BTNK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`split_heads` of a fused QKV projection's output (B, T, N, K) into queries, keys and
    values (B, n, T, K), ``heads`` = [queries, keys, values] heads, with queries and keys rotated
    by cos/sin as :func:`apply_rope` (in fp32, then in the values' dtype).

    Eagerly on CPU this is one autograd node: queries and keys are rotated together into one
    buffer, and the backward rotates their gradients straight into their places of the
    projection's gradient, the values' beside them, where the separate route rotates each into a
    fresh tensor and then concatenates the three (forward and backward of (32, 128, 12, 64) from
    memory on two cores: 7.5-8.6 ms against 8.3-9.1, ``benchmarks/cpu_kernels.py``). Large enough
    tensors, fp32 or bf16, take a compiled kernel each way (``kernels.compiled``: 1.2 and 2.7 ms
    against 2.9 and 4.0 for the eager passes); smaller fp32 ones the eager passes."""
    n_qk = heads[0] + heads[1]
    if not torch.compiler.is_compiling():
        cos_T1K = cos.unsqueeze(-2)
        if (kernels := compiled.rotary_kernels(packed_BTNK[:, :, :n_qk], cos_T1K, heads)) is not None:
            return _RotarySplit.apply(packed_BTNK, cos, sin, heads[0], heads[1], kernels)
        if packed_BTNK.dtype == torch.float32 and cos.dtype == torch.float32:
            return _RotarySplit.apply(packed_BTNK, cos, sin, heads[0], heads[1], None)
    q_BHTK, k_BGTK, v_BGTK = split_heads(packed_BTNK, heads)
    return apply_rope(q_BHTK, cos, sin).to(v_BGTK.dtype), apply_rope(k_BGTK, cos, sin).to(v_BGTK.dtype), v_BGTK


class _RotarySplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, cos, sin, n_q, n_k, kernels):
        cos_T1K, sin_T1K = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (…, T, 1, K): over the heads
        B, T, N, K = packed.shape
        if kernels is None:
            rotated = packed.new_empty(B, T, n_q + n_k, K)
            _rotate_into(rotated, packed[:, :, : n_q + n_k], cos_T1K, sin_T1K, sin_sign=1.0)
        else:
            rotated = kernels[0](packed[:, :, : n_q + n_k], cos_T1K, sin_T1K)
        ctx.save_for_backward(cos_T1K, sin_T1K)
        ctx.backward_kernel = None if kernels is None else kernels[1]
        q_BTHK, k_BTGK = rotated.split([n_q, n_k], dim=2)
        return q_BTHK.transpose(1, 2), k_BTGK.transpose(1, 2), packed[:, :, n_q + n_k :].transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos_T1K, sin_T1K = ctx.saved_tensors
        grads = [g.transpose(1, 2) for g in (grad_q, grad_k, grad_v)]  # (B, T, n, K) views
        if ctx.backward_kernel is not None:
            return ctx.backward_kernel(*grads, cos_T1K, sin_T1K), None, None, None, None, None
        B, T, _, K = grads[0].shape
        grad_packed = grads[0].new_empty(B, T, sum(g.shape[2] for g in grads), K)
        grad_q_slot, grad_k_slot, grad_v_slot = grad_packed.split([g.shape[2] for g in grads], dim=2)
        _rotate_into(grad_q_slot, grads[0], cos_T1K, sin_T1K, sin_sign=-1.0)
        _rotate_into(grad_k_slot, grads[1], cos_T1K, sin_T1K, sin_sign=-1.0)
        grad_v_slot.copy_(grads[2])
        return grad_packed, None, None, None, None, None


def positions_in_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token inside its own packed document, for rotary embeddings.

    ``doc_ids`` (B, T) holds documents as contiguous runs of one id (as ``data.packing`` emits
    them, -1 at padding). Position 0 is each run's first token (the row's first token, or one whose
    id differs from its left neighbour's), counting up from there; a run of padding counts as one
    more document, whose positions nothing real reads.
    """
    B, T = doc_ids.shape
    index_BT = torch.arange(T, device=doc_ids.device).expand(B, T)
    is_start_BT = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start_BT[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run_start_BT = torch.where(is_start_BT, index_BT, 0).cummax(dim=1).values  # latest start at or before t
    return index_BT - run_start_BT


# --- blocks --------------------------------------------------------------------------------------


class ResidualLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) that can add its output to a residual
    stream: ``forward(y, residual=r)`` is ``r + F.linear(y, weight, bias)``, computed as one
    ``addmm`` that accumulates the product into a copy of the residual, the bias then added in
    place: no product written out and read back for the sum (the throughput benchmark's
    (4096, 1024) -> 256 output projection and its residual, inputs from memory, two cores: 10.8
    ms against 12.5). Under autocast it is the plain sum: the matmul would take the residual in
    the autocast dtype."""

    def forward(self, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return super().forward(y)
        if torch.is_autocast_enabled(y.device.type) or residual.dtype != y.dtype:
            return residual + super().forward(y)
        out_ND = torch.addmm(residual.reshape(-1, self.out_features), y.reshape(-1, self.in_features), self.weight.t())
        if self.bias is not None:
            out_ND.add_(self.bias)
        return out_ND.view(residual.shape)


def project_out(proj: ResidualLinear, dropout: nn.Module, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + dropout(proj(y))`` (without a residual, ``dropout(proj(y))``): a sublayer's
    output projection, with the residual summed inside its matmul where dropout does nothing
    (its rate 0, or not training)."""
    if residual is not None and (dropout.p == 0.0 or not dropout.training):
        return proj(y, residual=residual)
    out = dropout(proj(y))
    return out if residual is None else residual + out


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (one matmul instead of three).

    The fused weight is (3D, D): rows [0, D) make queries, [D, 2D) keys, [2D, 3D) values, and
    within each the H heads lie one after another (K rows each). ``export/`` relies on this layout.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.attn_dropout = dropout
        self.qkv = HeadsLinear(d_model, [n_heads] * 3, d_model // n_heads)
        self.proj = ResidualLinear(d_model, d_model)
        self.resid_dropout = Dropout(dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        mask: torch.Tensor | None,
        queries: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D), mask from :func:`build_attention_mask` (dense, flex or None) -> (B, T, D),
        added to ``residual`` (B, T, D) if given (:func:`project_out`).

        ``queries`` (B, Q) restricts the output to those positions of each row -> (B, Q, D): keys
        and values still come from every position, queries and the output projection only from
        those (bidirectional attention only); a residual is then (B, Q, D)."""
        if queries is not None:
            return self.forward_at(x_BTD, mask, queries, residual)
        B, T, D = x_BTD.shape
        q_BHTK, k_BHTK, v_BHTK = self.qkv(x_BTD)
        dropout_p = self.attn_dropout if self.training else 0.0
        y_BHTK = attend(q_BHTK, k_BHTK, v_BHTK, mask, dropout_p=dropout_p, causal=self.causal)
        y_BTD = y_BHTK.transpose(1, 2).reshape(B, T, D)  # (B, T, H, K) -> (B, T, D)
        return project_out(self.proj, self.resid_dropout, y_BTD, residual)

    def forward_at(
        self,
        x_BTD: torch.Tensor,
        mask: torch.Tensor | None,
        queries_BQ: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.causal:
            raise ValueError("queries at chosen positions are for bidirectional attention only")
        B, T, D = x_BTD.shape
        H, Q = self.n_heads, queries_BQ.shape[1]
        w_q, w_kv = self.qkv.weight.split([D, 2 * D])
        b_q, b_kv = self.qkv.bias.split([D, 2 * D])
        q_BHQK = F.linear(gather_positions(x_BTD, queries_BQ), w_q, b_q).view(B, Q, H, D // H).transpose(1, 2)
        k_BHTK, v_BHTK = project_heads(x_BTD, w_kv, b_kv, [H, H], D // H)
        dropout_p = self.attn_dropout if self.training else 0.0
        y_BHQK = attend(q_BHQK, k_BHTK, v_BHTK, mask_rows(mask, queries_BQ), dropout_p=dropout_p, causal=False)
        return project_out(self.proj, self.resid_dropout, y_BHQK.transpose(1, 2).reshape(B, Q, D), residual)


def split_heads(packed_BTNK: torch.Tensor, heads: int | list[int]) -> tuple[torch.Tensor, ...]:
    """The heads (B, T, N, K) of a fused projection's output -> views (B, n, T, K), ``heads`` per
    view (as ``Tensor.split``).

    Split before transposing: the backward pass then concatenates the gradients straight into the
    projection's (B, T, N, K) layout, one copy. Transposed first, they are concatenated as
    (B, N, T, K) and copied a second time into that layout (copies and concatenations per training
    step of the throughput benchmark's 4-layer models on two cores: llama 19.8 -> 14.9 ms, gpt2
    25.6 -> 24.4 ms)."""
    return tuple(part.transpose(1, 2) for part in packed_BTNK.split(heads, dim=2))


def project_heads(
    x_BTD: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: list[int], head_dim: int
) -> tuple[torch.Tensor, ...]:
    """``split_heads(F.linear(x, weight, bias).view(B, T, N, head_dim), heads)``: a fused
    projection's heads, as views (B, n, T, K).

    On CPU in fp32 (eager) the backward takes each view's gradient as the attention's backward
    gives it and sums the parts' matmuls (the input's gradient accumulated in place, each part of
    the weight's written in its place), where autograd first concatenates the gradients into one
    (B, T, N, K) copy: 12 MB a layer of the throughput benchmark's GPT-2, whose projection
    backward took 16.4 ms against 17.0 (medians of 30 alternating rounds, inputs from memory)."""
    if not _cpu_fp32_eager(*(t for t in (x_BTD, weight, bias) if t is not None)) or torch.is_autocast_enabled("cpu"):
        B, T, _ = x_BTD.shape
        return split_heads(F.linear(x_BTD, weight, bias).view(B, T, -1, head_dim), heads)
    return _HeadsProjection.apply(x_BTD, weight, bias, heads, head_dim)


class HeadsLinear(nn.Linear):
    """``nn.Linear(in_features, sum(heads) · head_dim)`` (the state dict keeps ``weight`` and
    ``bias``) whose forward returns its output as heads, :func:`project_heads`; a module, so that
    hooks on it see it run."""

    def __init__(self, in_features: int, heads: list[int], head_dim: int, bias: bool = True) -> None:
        super().__init__(in_features, sum(heads) * head_dim, bias=bias)
        self.heads, self.head_dim = list(heads), head_dim

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return project_heads(x_BTD, self.weight, self.bias, self.heads, self.head_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, head_dim={self.head_dim}"


class _HeadsProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BTD, weight, bias, heads, head_dim):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        packed_ND = torch.mm(x_ND, weight.t()) if bias is None else torch.addmm(bias, x_ND, weight.t())
        ctx.save_for_backward(x_ND, weight)
        ctx.x_shape = x_BTD.shape
        ctx.rows = [n * head_dim for n in heads]
        ctx.has_bias = bias is not None
        return split_heads(packed_ND.view(B, T, -1, head_dim), heads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads_BnTK):
        x_ND, weight = ctx.saved_tensors
        N = x_ND.shape[0]
        # Each view's gradient (B, n, T, K) as (B·T, n·K) rows, with its part of the weight: a
        # view where the gradient is laid out as (B, T, n, K), as PyTorch's fused CPU attention
        # gives it; a copy otherwise. A part without a gradient (None) adds nothing.
        parts = [
            (None if grad is None else grad.transpose(1, 2).reshape(N, rows), weight_part)
            for grad, weight_part, rows in zip(grads_BnTK, weight.split(ctx.rows), ctx.rows, strict=True)
        ]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x_ND = None
            for grad_N, weight_part in parts:
                if grad_N is not None:
                    grad_x_ND = torch.mm(grad_N, weight_part) if grad_x_ND is None else grad_x_ND.addmm_(grad_N, weight_part)
            grad_x = (torch.zeros_like(x_ND) if grad_x_ND is None else grad_x_ND).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            for (grad_N, _), grad_part in zip(parts, grad_weight.split(ctx.rows), strict=True):
                if grad_N is None:
                    grad_part.zero_()
                else:
                    torch.mm(grad_N.t(), x_ND, out=grad_part)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = weight.new_empty(weight.shape[0])
            for (grad_N, _), grad_part in zip(parts, grad_bias.split(ctx.rows), strict=True):
                if grad_N is None:
                    grad_part.zero_()
                else:
                    torch.sum(grad_N, 0, out=grad_part)
        return grad_x, grad_weight, grad_bias, None, None


def gather_positions(x_BTD: torch.Tensor, positions_BQ: torch.Tensor) -> torch.Tensor:
    """(B, Q, D): row b's vectors at ``positions_BQ[b]``."""
    return x_BTD.gather(1, positions_BQ[..., None].expand(-1, -1, x_BTD.shape[-1]))


def mask_rows(mask: "torch.Tensor | FlexMask | None", queries_BQ: torch.Tensor) -> torch.Tensor | None:
    """The rows of an attention mask (dense (B, 1, T, T) or (T, T), or a :class:`FlexMask`) that
    belong to the query positions ``queries_BQ`` -> (B, 1, Q, T); None stays None."""
    if mask is None:
        return None
    if isinstance(mask, FlexMask):
        mask = mask.dense()
    if mask.dim() == 2:  # (T, T), the same for every row
        return mask[queries_BQ][:, None]
    return mask.gather(2, queries_BQ[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))


class PostNormEncoderBlock(nn.Module):
    """The post-LN encoder block of BERT and of BART's encoder (Vaswani et al. 2017, §3.1):
    ``x = LN(x + Attn(x)); x = LN(x + MLP(x))``, bidirectional, exact-erf GELU. ``config`` is any
    family config with ``d_model``, ``n_heads``, ``d_ff``, ``dropout`` and ``norm_eps``."""

    def __init__(self, config) -> None:
        super().__init__()
        self.attn = SelfAttention(config.d_model, config.n_heads, config.dropout, causal=False)
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config.d_model, config.d_ff, config.dropout, gelu="none")
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)

    def forward(
        self, x_BTD: torch.Tensor, mask: torch.Tensor | None, queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), or (B, Q, D) at the positions ``queries`` (B, Q) only: what
        those positions of the full output would be, computed there alone."""
        residual = x_BTD if queries is None else gather_positions(x_BTD, queries)
        x_BTD = self.attn_norm(self.attn(x_BTD, mask, queries, residual=residual))
        return self.mlp_norm(self.mlp(x_BTD, residual=x_BTD))


class MLP(nn.Module):
    """Position-wise feed-forward: D -> F, GELU, F -> D, dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, gelu: Literal["none", "tanh"]) -> None:
        """``gelu`` is ``F.gelu``'s ``approximate``: "none" is the exact erf form (BERT), "tanh"
        the tanh approximation (GPT-2, Hendrycks & Gimpel 2016, eq. in §2)."""
        super().__init__()
        self.fc = LinearGELU(d_model, d_ff, approximate=gelu)  # fc and its GELU
        self.proj = ResidualLinear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), added to ``residual`` if given (:func:`project_out`)."""
        return project_out(self.proj, self.dropout, self.fc(x_BTD), residual)


# --- init and counting ---------------------------------------------------------------------------


def init_normal(root: nn.Module, std: float = 0.02) -> None:
    """The classic BERT / GPT-2 init over every submodule of ``root``: linear and embedding weights
    from N(0, std²), biases zero, LayerNorm weight one and bias zero."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def count_params(root: nn.Module, exclude_embeddings: bool) -> int:
    """Parameters of ``root``, each shared (tied) tensor once. ``exclude_embeddings`` leaves out
    every ``nn.Embedding`` table (token, position, token type), as in the non-embedding count N of
    Kaplan et al. 2020 (§2.1) that compute estimates use; a head tied to the token embedding is
    then left out with it."""
    skipped = set()
    if exclude_embeddings:
        skipped = {id(m.weight) for m in root.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in root.parameters() if id(p) not in skipped)
