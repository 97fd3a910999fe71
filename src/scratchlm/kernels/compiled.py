"""Pointwise kernels that PyTorch's compiler (Inductor) writes for the CPU, taken where PyTorch's
own eager kernels are slow.

GELU's tanh form (GPT-2, T5) after a bias: ATen's CPU GELU evaluates the tanh at a cost of its own
(3.5-3.8 ms forward, 4.1-4.2 ms backward for (4096, 1024) fp32 on two cores, where the erf form
takes 0.9 and 1.6), and a linear layer's bias is one more pass over its output (``addmm`` copies it
in before the matmul). Written as ``x·σ(2u)`` (``0.5·(1 + tanh u) = σ(2u)``) with the bias added
inside, each direction is one compiled loop: with the inputs out of cache, forward 3.2 ms against
5.8 for the bias copy and ATen's GELU, backward 3.5 ms against 5.4; values within 5e-7 of ATen's
(``benchmarks/results/2026-11-26-cpu-2core.md``). ATen's bf16 kernel costs what its fp32 one does;
under bf16 autocast the same loops read and write bf16 (``GELU_TANH_DTYPES``).

Each kernel is compiled once per process and dtype on first use, for any shape: about 8 s on
two cores (22 s the first time on a machine, before Inductor's cache on disk holds it). At a few
ms saved per layer and step that pays back within a few hundred steps, so tensors under
``MIN_ELEMENTS`` values (tests, toy models) keep the eager kernels and never start the compiler.
Where compiling fails (no C++ compiler, an unsupported platform) one warning is given and the
eager kernels run from then on.
"""

from collections.abc import Callable
import math
import warnings

import torch

GELU_TANH_DEVICES = ("cpu",)
"""Devices whose GELU-tanh goes through the compiled kernels (on CUDA PyTorch's own kernel is one
fused pass already)."""

GELU_TANH_DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes of the pre-activation the kernels take: fp32, and bf16 (under CPU autocast), whose ATen
tanh GELU costs what fp32's does (4.1 ms forward, 4.2 backward for (4096, 1024) on two cores). The
arithmetic is fp32 either way; the result comes back in the pre-activation's dtype."""

MIN_ELEMENTS = 1 << 18
"""Outputs smaller than this keep the eager kernels (GPT-2 ``tiny`` at batch 16 × 128: 2^21)."""

_TWO_C = 2 * math.sqrt(2 / math.pi)
_A = 0.044715


def bias_gelu_tanh_forward(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU's tanh form of ``x = h + bias``, ``0.5·x·(1 + tanh(c·(x + a·x³)))``, spelled
    ``x·σ(2c·(x + a·x³))``."""
    x = h + bias
    return (x * torch.sigmoid(_TWO_C * (x + _A * x * x * x))).to(h.dtype)


def bias_gelu_tanh_backward(grad: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The gradient for ``h`` (and, summed over rows, for ``bias``): ``grad · d/dx [x·σ(u)]`` with
    ``u = 2c·(x + a·x³)``, which is ``σ(u) + x·σ(u)·(1 − σ(u))·u'``, in ``grad``'s dtype."""
    x = h + bias
    s = torch.sigmoid(_TWO_C * (x + _A * x * x * x))
    return (grad * (s + x * s * (1 - s) * (_TWO_C * (1 + 3 * _A * x * x)))).to(grad.dtype)


_state: dict = {"kernels": None, "ready": set(), "failed": False}


def bias_gelu_tanh_kernels(
    x: torch.Tensor, elements: int, dtype: torch.dtype | None = None
) -> tuple[Callable, Callable] | None:
    """(forward, backward) of :func:`bias_gelu_tanh_forward` and :func:`bias_gelu_tanh_backward`
    compiled for rows (N, F) of ``dtype`` (``x``'s by default) and an fp32 bias (F,) on ``x``'s
    device, for an output of ``elements`` values; None where they do not apply (another
    device or dtype, fewer than ``MIN_ELEMENTS`` values) or compiling failed."""
    dtype = x.dtype if dtype is None else dtype
    if (
        x.device.type not in GELU_TANH_DEVICES
        or dtype not in GELU_TANH_DTYPES
        or elements < MIN_ELEMENTS
        or _state["failed"]
    ):
        return None
    key = (x.device.type, dtype)
    if key not in _state["ready"]:
        # Compiled here for each dtype, so that a failure shows now and not in a backward, on a
        # sample of a training step's size: the compiler takes the first length as the typical
        # one and leaves a kernel first compiled for a short tensor on one thread (2x slower).
        try:
            if _state["kernels"] is None:
                _state["kernels"] = (
                    torch.compile(bias_gelu_tanh_forward, dynamic=True),
                    torch.compile(bias_gelu_tanh_backward, dynamic=True),
                )
            forward, backward = _state["kernels"]
            sample = torch.linspace(-4.0, 4.0, 1 << 20, device=x.device).view(1024, 1024).to(dtype)
            bias = torch.zeros(1024, device=x.device)
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                forward(sample, bias)
                backward(torch.ones_like(sample), sample, bias)
        except Exception as error:  # noqa: BLE001  (any compiler failure)
            _state["failed"] = True
            warnings.warn(
                f"compiling the CPU GELU-tanh kernel failed ({type(error).__name__}: {error}); "
                "PyTorch's eager kernel is used instead",
                stacklevel=3,
            )
            return None
        _state["ready"].add(key)
    return _state["kernels"]
