"""Pointwise kernels that PyTorch's compiler (Inductor) writes for the CPU, taken where PyTorch's
own eager kernels are slow: each pair of functions below (forward, backward) is one loop each
way where the eager route makes several passes over memory or evaluates a transcendental slowly.

- GELU's tanh form after a bias (GPT-2, T5): ATen's CPU GELU evaluates the tanh at a cost of its
  own (3.5-3.8 ms forward, 4.1-4.2 ms backward for (4096, 1024) fp32 on two cores, where the erf
  form takes 0.9 and 1.6), and a linear layer's bias is one more pass over its output (``addmm``
  copies it in before the matmul). Written as ``x·σ(2u)`` (``0.5·(1 + tanh u) = σ(2u)``) with the
  bias added inside: forward 2.4 ms against 5.8 for the bias copy and ATen's GELU, backward 2.9
  against 5.4; values within 5e-7 of ATen's (``benchmarks/results/2026-11-26-cpu-2core.md``).
  ATen's bf16 kernel costs what its fp32 one does; under bf16 autocast the same loops read and
  write bf16. Where the pre-activation is the caller's own matmul output (GPT-2's MLP), a third
  loop, :func:`bias_gelu_tanh_forward_`, also writes GELU's slope over it, and the backward is
  then a plain multiply (4.2 -> 1.6 ms for 0.3 ms more forward).
- Rotary embeddings of a fused QKV projection's queries and keys (Llama, ModernBERT): the eager
  route (``layers._rotate_into``) makes three passes each way over strided halves; for (32, 128,
  12, 64) forward 1.2 ms against 2.9, backward 2.7 against 4.0.
- RMS norm (Llama, T5): PyTorch's CPU norm has no fused backward, and the hand-written eager one
  (``layers._RMSNorm``) makes five passes; here one loop over the rows each way, the weight's
  gradient summed in the backward's (forward and backward of (32, 128, 256) through autograd:
  3.8-4.0 ms against 5.7-5.9).
- The gate of a gated MLP, ``act(a)·b`` (SwiGLU, GeGLU): ATen makes two passes forward and three
  backward, and keeps ``act(a)`` for the backward; here one pass each way, and only ``a`` and
  ``b`` are kept (SwiGLU on (4096, 688): 2.0 / 2.8 ms against 2.7 / 4.4).

Each pair is compiled once per process for each device, dtype and shape of the trailing
dimensions (the model's widths), with the leading dimensions (batch, length, rows) left dynamic:
one compile serves every batch, and the loops know their widths (a kernel compiled with every
dimension dynamic ran up to 1.4x slower: GELU-tanh's backward 4.1 ms against 2.9). Compiling
takes a few seconds a pair on two cores (more the first time on a machine, before Inductor's
cache on disk holds it), so tensors under ``MIN_ELEMENTS`` values (tests, toy models) keep the
eager kernels and never start the compiler. Where compiling fails (no C++ compiler, an
unsupported platform) one warning is given and the eager kernels run from then on.
"""

from collections.abc import Callable
import math
import warnings

import torch
import torch.nn.functional as F

DEVICES = ("cpu",)
"""Devices whose pointwise work goes through these kernels (on CUDA PyTorch's own kernels are one
fused pass already, and ``kernels.liger`` covers the rest)."""

DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes the kernels take their activations in: fp32, and bf16 (under CPU autocast), whose ATen
kernels cost what fp32's do (tanh GELU: 4.1 ms forward, 4.2 backward for (4096, 1024) on two
cores). The arithmetic is fp32 either way; results come back in the activations' dtype."""

MIN_ELEMENTS = 1 << 18
"""Tensors with fewer values than this keep the eager kernels (GPT-2 ``tiny`` at batch 16 × 128:
an MLP activation of 2^20). The first kernel a process uses costs ~6.3 s on two cores even with
Inductor's disk cache warm (importing the compiler 3.6 s, probing the CPU's vector instructions
in child processes 2.9 s); at that size the kernels save 1.5% of a training step (GPT-2 tiny
3.8 ms, Llama tiny 7.3 ms at batch 16 × 128, in-process A/B), paid back after ~1,700 and ~900
steps: about even over the tiny recipes' 800, a gain over anything longer or larger."""

_TWO_C = 2 * math.sqrt(2 / math.pi)
_A = 0.044715


# --- the functions compiled ----------------------------------------------------------------------


def _gelu_tanh_sigmoid(h: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = h + bias`` and ``σ(u)``, ``u = 2c·(x + a·x³)``: GELU's tanh form is
    ``0.5·x·(1 + tanh(c·(x + a·x³)))``, spelled ``x·σ(u)``."""
    x = h + bias
    return x, torch.sigmoid(_TWO_C * (x + _A * x * x * x))


def _gelu_tanh_slope(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``d/dx [x·σ(u)]`` from ``x`` and ``s = σ(u)``: ``σ(u) + x·σ(u)·(1 − σ(u))·u'``."""
    return s + x * s * (1 - s) * (_TWO_C * (1 + 3 * _A * x * x))


def bias_gelu_tanh_forward(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU's tanh form of ``h + bias``."""
    x, s = _gelu_tanh_sigmoid(h, bias)
    return (x * s).to(h.dtype)


def bias_gelu_tanh_forward_(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`bias_gelu_tanh_forward`, with GELU's slope at ``h + bias`` written over ``h`` in the
    same loop: the backward is then one multiply, no exponential (forward and backward of (4096,
    1024) on two cores: 4.25 + 1.74 ms against 3.84 + 4.34 recomputing the slope)."""
    x, s = _gelu_tanh_sigmoid(h, bias)
    h.copy_(_gelu_tanh_slope(x, s))
    return (x * s).to(h.dtype)


def bias_gelu_tanh_backward(grad: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The gradient for ``h`` (and, summed over rows, for ``bias``), in ``grad``'s dtype."""
    x, s = _gelu_tanh_sigmoid(h, bias)
    return (grad * _gelu_tanh_slope(x, s)).to(grad.dtype)


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``(x1·cos − x2·sin, x2·cos + x1·sin)`` on the halves of the last dimension, in fp32; cos
    and sin hold each frequency twice (``layers.rope_cos_sin``), so their first halves suffice."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rotary_forward(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Queries and keys (B, T, n, K), a strided slice of the fused projection, rotated by the
    fp32 cos/sin (T, 1, K) or (B, T, 1, K), into a new (B, T, n, K) tensor of their dtype."""
    return _rotate_halves(qk, cos, sin).to(qk.dtype)


def rotary_split_backward(
    grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The fused projection's gradient (B, T, N, K) from those of queries, keys (rotated back:
    the rotation is orthogonal, so by the opposite angle) and values, each (B, T, n, K)."""
    return torch.cat(
        [_rotate_halves(grad_q, cos, -sin), _rotate_halves(grad_k, cos, -sin), grad_v.float()], dim=2
    ).to(grad_v.dtype)


def _activation(a: torch.Tensor, name: str) -> torch.Tensor:
    return a * torch.sigmoid(a) if name == "silu" else F.gelu(a)


def gated_forward(a: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(a)·b`` in fp32, in ``b``'s dtype; ``activation`` "silu" or "gelu" (the erf form)."""
    a32 = a.float()
    return (_activation(a32, activation) * b.float()).to(b.dtype)


def gated_backward(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``act(a)·b``, ``(grad·b·act'(a), grad·act(a))``, in ``grad``'s dtype;
    act'(a) is ``σ(a)·(1 + a·(1 − σ(a)))`` for SiLU and ``Φ(a) + a·φ(a)`` for GELU."""
    g, a32, b32 = grad.float(), a.float(), b.float()
    if activation == "silu":
        s = torch.sigmoid(a32)
        act, slope = a32 * s, s * (1 + a32 * (1 - s))
    else:
        cdf = 0.5 * (1 + torch.erf(a32 * (1 / math.sqrt(2))))
        act, slope = a32 * cdf, cdf + a32 * torch.exp(-0.5 * a32 * a32) * (1 / math.sqrt(2 * math.pi))
    return (g * b32 * slope).to(grad.dtype), (g * act).to(grad.dtype)


def gated_backward_(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, activation: str) -> None:
    """:func:`gated_backward` written over ``a`` and ``b`` (two tensors, in ``grad``'s dtype):
    each pair of values is read once, then replaced by its pair of gradients."""
    grad_a, grad_b = gated_backward(grad, a, b, activation)
    a.copy_(grad_a)
    b.copy_(grad_b)


def gated_backward_joined(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:
    """:func:`gated_backward`'s two gradients side by side, (rows, 2F): the gradient of the one
    tensor whose halves ``a`` and ``b`` are."""
    return torch.cat(gated_backward(grad, a, b, activation), dim=-1)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS norm of the rows of ``x`` (rows, D), scaled by ``weight``, and the reciprocal RMS of
    each row (rows, 1) that the backward starts from: ``x·rstd·weight``, ``rstd = (mean(x²) +
    eps)^-½``."""
    rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return x * rstd * weight, rstd


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`rms_norm_forward` for ``x`` and ``weight``: with ``x̂ = x·rstd``
    and ``g = grad·weight``, ``rstd·(g − x̂·mean(g·x̂))`` per row, and ``Σ grad·x̂`` over the rows."""
    x_hat = x * rstd
    grad_x_hat = grad * weight
    grad_x = rstd * (grad_x_hat - x_hat * (grad_x_hat * x_hat).mean(-1, keepdim=True))
    return grad_x, (grad * x_hat).sum(0)


# --- compiling on first use ----------------------------------------------------------------------

_state: dict = {"compiled": {}, "ready": set(), "failed": False}


def kernels(
    name: str, functions: tuple[Callable, ...], key: tuple, warm_up: Callable[..., None]
) -> tuple[Callable, ...] | None:
    """``functions`` compiled, after ``warm_up(*compiled)`` has run them once for ``key`` (the
    device, dtypes and static widths they will see), or None where compiling failed, now or
    before (``name`` is the warning's). The warm-up takes inputs of a real call's sizes and
    layout, with the leading dimensions marked dynamic (:func:`dynamic_leading`): the compiler
    takes the first sizes it sees as the typical ones (a kernel first compiled for a short tensor
    runs on one thread), and a failure shows there, in a forward, not in some later backward."""
    if _state["failed"]:
        return None
    try:
        compiled = tuple(_state["compiled"].get(f) or _compile(f) for f in functions)
        if key not in _state["ready"]:
            with torch.no_grad():
                warm_up(*compiled)
            _state["ready"].add(key)
    except Exception as error:  # noqa: BLE001  (any compiler failure)
        _state["failed"] = True
        warnings.warn(
            f"compiling the CPU {name} kernel failed ({type(error).__name__}: {error}); "
            "PyTorch's eager kernels are used instead",
            stacklevel=3,
        )
        return None
    return compiled


def _compile(function: Callable) -> Callable:
    """``function`` compiled, called outside autocast and on detached tensors: the compiler guards
    on the autocast state and on each input's ``requires_grad``, so a call under autocast, or
    with an autograd node's input (which requires a gradient) where the warm-up had a plain
    tensor, would compile the function again (the kernels cast for themselves, and run where no
    gradient is recorded)."""
    compiled = torch.compile(function)

    def call(*args):
        with torch.autocast("cpu", enabled=False):
            return compiled(*(a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args))

    _state["compiled"][function] = call
    return call


def dynamic_leading(t: torch.Tensor) -> torch.Tensor:
    """A new alias of ``t`` whose leading dimensions (all but the last two; the first of a
    matrix) the compiler treats as dynamic: batch, length and rows vary, widths do not."""
    alias = t.detach()
    for dim in range(max(1, t.dim() - 2) if t.dim() > 1 else 0):
        torch._dynamo.mark_dynamic(alias, dim)
    return alias


def applies(elements: int, device: torch.device, *dtypes: torch.dtype) -> bool:
    """Whether the kernels may take activations of ``elements`` values (at least
    ``MIN_ELEMENTS``) on ``device`` (one of ``DEVICES``) in ``dtypes`` (of ``DTYPES``), eagerly."""
    return (
        elements >= MIN_ELEMENTS
        and not _state["failed"]
        and not torch.compiler.is_compiling()
        and torch.device(device).type in DEVICES
        and all(dtype in DTYPES for dtype in dtypes)
    )


def bias_gelu_tanh_kernels(
    rows: int, width: int, dtype: torch.dtype, device: torch.device, pre_activation: torch.Tensor | None = None
) -> tuple[Callable, Callable, Callable] | None:
    """(:func:`bias_gelu_tanh_forward`, :func:`bias_gelu_tanh_backward`,
    :func:`bias_gelu_tanh_forward_`) for pre-activations
    (rows, width) of ``dtype`` on ``device`` and an fp32 bias (width,); None where they do not
    apply. The pre-activation is a matmul's contiguous output, or ``pre_activation`` (…, width)
    in ``dtype`` or cast to it, whose layout the kernels are then compiled for (T5's gate is a
    strided half)."""
    if not applies(rows * width, device, dtype):
        return None
    bias = torch.zeros(width, device=device)

    def sample() -> torch.Tensor:
        if pre_activation is None:
            return torch.zeros(rows, width, dtype=dtype, device=device)
        return pre_activation.to(dtype).reshape(-1, width)

    def warm_up(forward, backward, forward_):
        h = dynamic_leading(sample())
        backward(dynamic_leading(forward(h, bias)), h, bias)
        forward_(dynamic_leading(h.clone()), bias)

    strided = pre_activation is not None and pre_activation.dtype == dtype
    row_stride = pre_activation.reshape(-1, width).stride(0) if strided else width
    key = ("gelu_tanh", torch.device(device).type, dtype, width, row_stride)
    functions = (bias_gelu_tanh_forward, bias_gelu_tanh_backward, bias_gelu_tanh_forward_)
    return kernels("GELU-tanh", functions, key, warm_up)


def rms_norm_kernels(x: torch.Tensor, eps: float) -> tuple[Callable, Callable] | None:
    """(:func:`rms_norm_forward`, :func:`rms_norm_backward`) for inputs like ``x`` (…, D), taken
    as contiguous rows (rows, D), an fp32 weight and this ``eps``; None where they do not apply."""
    if not applies(x.numel(), x.device, x.dtype):
        return None
    width = x.shape[-1]

    def warm_up(forward, backward):
        rows = dynamic_leading(torch.zeros(x.numel() // width, width, dtype=x.dtype, device=x.device))
        weight = torch.ones(width, device=x.device)
        y, rstd = forward(rows, weight, eps)
        backward(dynamic_leading(y), rows, weight, dynamic_leading(rstd))

    key = ("rms_norm", x.device.type, x.dtype, width, eps)
    return kernels("RMSNorm", (rms_norm_forward, rms_norm_backward), key, warm_up)


def rotary_kernels(qk: torch.Tensor, cos: torch.Tensor, heads: list[int]) -> tuple[Callable, Callable] | None:
    """(:func:`rotary_forward`, :func:`rotary_split_backward`) for queries and keys like ``qk``
    (B, T, n_q + n_k, K), a slice of the fused projection of ``heads`` = [n_q, n_k, n_v] heads,
    and fp32 cos/sin like ``cos`` ((T, 1, K) or (B, T, 1, K)); None where they do not apply.
    The backward is warmed up on gradients laid out as the attention's backward gives them (a
    gradient laid out otherwise compiles it once more): PyTorch's fused CPU kernel (fp32) in the
    projection's (B, T, n, K) order, the matmul route (``layers.matmul_attention``, bf16) as
    (B, n, T, K) tensors."""
    if cos.dtype != torch.float32 or not applies(qk.numel(), qk.device, qk.dtype):
        return None
    B, T, _, K = qk.shape

    def gradient(n: int) -> torch.Tensor:
        if qk.dtype == torch.float32:
            return qk.new_zeros(B, T, n, K)
        return qk.new_zeros(B, n, T, K).transpose(1, 2)

    def warm_up(forward, backward):
        forward(dynamic_leading(qk), dynamic_leading(cos), dynamic_leading(cos))
        backward(*(dynamic_leading(gradient(n)) for n in heads), dynamic_leading(cos), dynamic_leading(cos))

    key = ("rotary", qk.device.type, qk.dtype, cos.dim(), K, *heads)
    return kernels("rotary", (rotary_forward, rotary_split_backward), key, warm_up)


def gated_kernels(
    a: torch.Tensor, b: torch.Tensor, activation: str
) -> tuple[Callable, Callable, Callable | None] | None:
    """(:func:`gated_forward`, a backward, the backward written over ``a`` and ``b`` or None) for
    ``act(a)·b`` with ``a`` and ``b`` (rows, F) either two contiguous tensors, whose gradients
    come back as two (:func:`gated_backward`: the matmuls after it read contiguous rows; forward
    and backward of the throughput benchmark's SwiGLU input projection, interleaved: 34.4 ms
    against 35.3 through one joined gradient and 36.2 eager) or in their place
    (:func:`gated_backward_`), or the halves of one (rows, 2F), whose gradient comes back as one
    (:func:`gated_backward_joined`; no version in place); None where they do not apply."""
    if not applies(a.numel(), a.device, a.dtype, b.dtype):
        return None
    joined = a.stride(0) != a.shape[-1]
    functions = (gated_forward, gated_backward_joined) if joined else (gated_forward, gated_backward, gated_backward_)

    def warm_up(forward, backward, backward_=None):
        a_, b_ = dynamic_leading(a), dynamic_leading(b)
        grad = dynamic_leading(forward(a_, b_, activation))
        backward(grad, a_, b_, activation)
        if backward_ is not None:
            backward_(grad, dynamic_leading(a.clone()), dynamic_leading(b.clone()), activation)

    key = ("gated", activation, a.device.type, a.dtype, a.shape[-1], joined)
    compiled = kernels(f"gated {activation}", functions, key, warm_up)
    return (*compiled, None) if compiled is not None and joined else compiled
