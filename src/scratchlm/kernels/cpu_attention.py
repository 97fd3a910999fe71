"""Attention on the CPU in fp32 for short sequences, forward and backward in C++
(``cpu_attention.cpp``), where PyTorch's fused CPU kernel is slow.

PyTorch's flash kernel for the CPU cuts the queries into blocks of 32 below 192 of them and runs
each block's two matmuls as separate small GEMM calls; at GPT-2-small-like shapes it reaches ~15%
of the machine's matmul rate. Ours keeps a block's scores in cache, runs the matmuls in register
tiles, and recomputes the probabilities in the backward from the saved log-sum-exp, as a flash
kernel does. Over (32, 4, 128, 64), causal, on two cores: forward 3.1-3.2 ms against 6.2-6.5,
backward 6.5-6.9 against 13.0-14.3 (``benchmarks/results/2026-11-27-cpu-2core.md``, run 7).

The library is built the first time a process needs it, with the C++ compiler (``$CXX``, else
``c++``) that PyTorch's own compiler needs on CPU too, for this machine's instructions
(``-march=native``), and kept in ``$SCRATCHLM_CACHE_DIR`` (else ``~/.cache/scratchlm``) under a
name that hashes the source, the flags, the compiler and the CPU: a second process loads it in
milliseconds. The build writes to a temporary file that replaces the library in one rename, so
processes building at once never load half a file. It runs on ``torch.get_num_threads()`` OpenMP
threads; where PyTorch ships its own ``libgomp.so.1`` (the Linux wheels), the library binds to
that one, already loaded, and shares its threads. Where the build or the load fails, one warning
is given and SDPA runs from then on; ``SCRATCHLM_CPU_ATTENTION=0`` turns the kernel off.

The kernel computes bidirectional attention too (tested against SDPA), but the models take it for
causal attention only (``models.layers.sdpa``): bidirectional, it is ~11% faster than SDPA alone
at 128 keys and even from 256, and whole bert and modernbert training steps came out even
(paired steps in one process: 0.994 and 1.007), where gpt2 and llama steps gain 2.5-2.8%.
"""

import ctypes
import hashlib
import os
from pathlib import Path
import platform
import subprocess
import tempfile
import warnings

import torch

SOURCE = Path(__file__).with_name("cpu_attention.cpp")

WIDTHS = (32, 64, 128)
"""Head widths the kernel is instantiated for."""

MAX_KEYS = 512
"""Longest key sequence the kernel takes; longer ones go to SDPA, whose query blocks grow from 192
queries on. Causal forward and backward of 4096 tokens in heads of 64 from a fused projection,
two cores, ours against SDPA: 128 keys 13.0-13.5 ms against 18.3-20.5, 256: 14.4-18.9 against
28.3-30.1, 512: 26.8-27.1 against 39.0-47.4, 1024: 48.7-57.3 against 55.4-65.2 (even)."""

FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC")

_state: dict = {"library": None, "failed": os.environ.get("SCRATCHLM_CPU_ATTENTION", "1") == "0"}


def applies(q_BHQK: torch.Tensor, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor) -> bool:
    """Whether :func:`attention` takes these inputs: fp32 on the CPU, eagerly and outside autocast
    (where SDPA would compute in bf16), a head width of ``WIDTHS``, at most ``MAX_KEYS`` keys,
    unit stride along the head width, and the library built (building it here the first time)."""
    G, T, K = k_BGTK.shape[1:]
    return (
        not _state["failed"]
        and K in WIDTHS
        and T <= MAX_KEYS
        and q_BHQK.shape[1] % G == 0
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q_BHQK, k_BGTK, v_BGTK))
        and all(t.stride(-1) == 1 for t in (q_BHQK, k_BGTK, v_BGTK))
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and _library() is not None
    )


def attention(
    q_BHQK: torch.Tensor, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor, is_causal: bool, scale: float | None = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
    enable_gqa=True)`` for inputs :func:`applies` accepts; the result is (B, H, Q, K), laid out as
    (B, Q, H, K) so that merging the heads is a view."""
    scale = q_BHQK.shape[-1] ** -0.5 if scale is None else scale
    return _Attention.apply(q_BHQK, k_BGTK, v_BGTK, is_causal, scale)


def _pointer_and_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return (t.data_ptr(), *t.stride()[:3])


def _check(status: int, width: int) -> None:
    if status != 0:
        raise RuntimeError(f"the CPU attention kernel has no instance for heads of width {width} (it has {WIDTHS})")


def _empty_like_heads(t: torch.Tensor, heads: int, length: int) -> torch.Tensor:
    """An uninitialised (B, heads, length, K) tensor stored as (B, length, heads, K)."""
    return t.new_empty(t.shape[0], length, heads, t.shape[-1]).transpose(1, 2)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHQK, k_BGTK, v_BGTK, causal, scale):
        B, H, Q, K = q_BHQK.shape
        G, T = k_BGTK.shape[1:3]
        out_BHQK = _empty_like_heads(q_BHQK, H, Q)
        lse_BHQ = q_BHQK.new_empty(B, H, Q)
        _check(_library().scratchlm_attention_forward(
            *_pointer_and_strides(q_BHQK), *_pointer_and_strides(k_BGTK), *_pointer_and_strides(v_BGTK),
            *_pointer_and_strides(out_BHQK), lse_BHQ.data_ptr(), B, H, G, Q, T, K, int(causal), scale,
            torch.get_num_threads(),
        ), K)  # fmt: skip
        ctx.save_for_backward(q_BHQK, k_BGTK, v_BGTK, out_BHQK, lse_BHQ)
        ctx.causal, ctx.scale = causal, scale
        return out_BHQK

    @staticmethod
    def backward(ctx, grad_BHQK):
        q_BHQK, k_BGTK, v_BGTK, out_BHQK, lse_BHQ = ctx.saved_tensors
        B, H, Q, K = q_BHQK.shape
        G, T = k_BGTK.shape[1:3]
        if grad_BHQK.stride(-1) != 1:
            grad_BHQK = grad_BHQK.contiguous()
        grad_q = _empty_like_heads(q_BHQK, H, Q)
        grad_k, grad_v = _empty_like_heads(k_BGTK, G, T), _empty_like_heads(v_BGTK, G, T)
        _check(_library().scratchlm_attention_backward(
            *_pointer_and_strides(q_BHQK), *_pointer_and_strides(k_BGTK), *_pointer_and_strides(v_BGTK),
            *_pointer_and_strides(out_BHQK), *_pointer_and_strides(grad_BHQK), lse_BHQ.data_ptr(),
            *_pointer_and_strides(grad_q), *_pointer_and_strides(grad_k), *_pointer_and_strides(grad_v),
            B, H, G, Q, T, K, int(ctx.causal), ctx.scale, torch.get_num_threads(),
        ), K)  # fmt: skip
        return grad_q, grad_k, grad_v, None, None


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scratchlm"
    return Path(os.environ.get("SCRATCHLM_CACHE_DIR") or default)


def _library() -> ctypes.CDLL | None:
    """The built library, building it the first time; None (one warning) where that fails."""
    if _state["library"] is not None or _state["failed"]:
        return _state["library"]
    try:
        library = ctypes.CDLL(str(_build()))
    except Exception as error:  # noqa: BLE001  (a compiler missing or failing, a library that will not load)
        _state["failed"] = True
        warnings.warn(
            f"building the CPU attention kernel failed ({type(error).__name__}: {error}); "
            "PyTorch's scaled_dot_product_attention is used instead",
            stacklevel=3,
        )
        return None
    pointer, long, int_, float_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    tensor = [pointer, long, long, long]
    library.scratchlm_attention_forward.argtypes = tensor * 4 + [pointer] + [int_] * 7 + [float_, int_]
    library.scratchlm_attention_backward.argtypes = tensor * 5 + [pointer] + tensor * 3 + [int_] * 7 + [float_, int_]
    _state["library"] = library
    return library


def _build() -> Path:
    compiler = os.environ.get("CXX", "c++")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        b"\0".join(
            [SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), _cpu_description().encode()]
        )
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".partial.so")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _cpu_description() -> str:
    """The CPU's model and instruction flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))
