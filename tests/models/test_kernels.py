"""The hand-written eager kernels, and the compiled ones of ``kernels.compiled``, equal what they
replace, forward and backward."""

import shutil
import warnings

import pytest
import torch

from torch import nn

from scratchlm.kernels import compiled
from scratchlm.models.layers import RMSNorm, apply_rope, gated, gated_linear, gelu, linear_gelu, rope_cos_sin

needs_a_compiler = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++")), reason="the compiled CPU kernels need a C++ compiler"
)
def case(route: str, *values):
    """A parameter set whose compiled route needs a compiler."""
    return pytest.param(route, *values, marks=[needs_a_compiler] if route == "compiled" else [])


def take_route(route: str, monkeypatch) -> None:
    """Small tensors take the compiled kernels too ("compiled"), or none do ("eager")."""
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1 if route == "compiled" else 1 << 62)


def textbook(x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` (Su et al. 2021, in Hugging Face's half-split layout)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


@pytest.mark.parametrize("per_document", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rope_matches_the_formula(per_document, dtype):
    generator = torch.Generator().manual_seed(0)
    B, H, T, K = 3, 2, 7, 8
    positions = torch.randint(0, 50, (B, T), generator=generator) if per_document else torch.arange(T)
    cos, sin = rope_cos_sin(positions, K, theta=10000.0)
    # A strided view, as queries are when split out of a fused projection.
    qkv = torch.randn(B, T, 3, H, K, generator=generator).to(dtype)
    x = qkv[:, :, 0].transpose(1, 2).detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(B, H, T, K, generator=generator)

    y, y_ref = apply_rope(x, cos, sin), textbook(x_ref, cos, sin)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref)
    (grad,) = torch.autograd.grad(y, x, grad_out.to(y.dtype))
    (grad_ref,) = torch.autograd.grad(y_ref, x_ref, grad_out.to(y.dtype))
    assert grad.dtype == x.dtype
    tolerance = {"rtol": 1.6e-2, "atol": 1.6e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(grad, grad_ref, **tolerance)


ROTARY_CASES = [
    case("eager", per_document, heads, dtype)
    for per_document in (False, True)
    for heads in ([2, 2, 2], [4, 2, 2])
    for dtype in (torch.float32, torch.bfloat16)
] + [  # compiling takes seconds a case: two cover the compiled kernels' variants
    case("compiled", True, [4, 2, 2], torch.float32),
    case("compiled", False, [2, 2, 2], torch.bfloat16),
]


@pytest.mark.parametrize(("route", "per_document", "heads", "dtype"), ROTARY_CASES)
def test_rotary_split_heads_matches_split_then_rope(route, per_document, heads, dtype, monkeypatch):
    """One node for splitting a fused QKV output and rotating queries and keys (grouped keys too):
    the same three tensors and the same gradient for the fused output as the textbook formula
    applied after a plain split, also where the loss leaves the values out; eager and compiled."""
    from scratchlm.models.layers import rotary_split_heads, split_heads

    take_route(route, monkeypatch)
    generator = torch.Generator().manual_seed(0)
    B, T, K = 3, 7, 8
    positions = torch.randint(0, 50, (B, T), generator=generator) if per_document else torch.arange(T)
    cos, sin = rope_cos_sin(positions, K, theta=10000.0)
    packed = torch.randn(B, T, sum(heads), K, generator=generator).to(dtype).requires_grad_()
    packed_ref = packed.detach().clone().requires_grad_()
    got = rotary_split_heads(packed, cos, sin, heads)
    assert (getattr(got[0].grad_fn, "backward_kernel", None) is not None) == (route == "compiled")
    q_ref, k_ref, v_ref = split_heads(packed_ref, heads)
    want = (textbook(q_ref.float(), cos, sin).to(dtype), textbook(k_ref.float(), cos, sin).to(dtype), v_ref)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == dtype
        torch.testing.assert_close(g, w)
    tolerance = {"rtol": 1.6e-2, "atol": 1.6e-2} if dtype == torch.bfloat16 else {}
    for used in (3, 2):  # all three, then queries and keys only
        grad_outs = [torch.randn(w.shape, generator=generator).to(dtype) for w in want[:used]]
        (grad,) = torch.autograd.grad(got[:used], packed, grad_outs, retain_graph=True)
        (grad_ref,) = torch.autograd.grad(want[:used], packed_ref, grad_outs, retain_graph=True)
        torch.testing.assert_close(grad, grad_ref, **tolerance)


def test_rope_rotates_by_the_position():
    """Position p rotates pair (i, i + K/2) by p·theta^(-2i/K): position 0 leaves x as it is, and
    a rotation keeps each pair's length."""
    cos, sin = rope_cos_sin(torch.arange(5), 4, theta=100.0)
    x = torch.randn(1, 1, 5, 4)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    pair_norms = lambda t: t[..., :2] ** 2 + t[..., 2:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norms(y), pair_norms(x))
    angle = torch.tensor(3 * 100.0 ** (-2 * 1 / 4))  # position 3, pair 1 (dims 1 and 3)
    expected = x[0, 0, 3, 1] * angle.cos() - x[0, 0, 3, 3] * angle.sin()
    torch.testing.assert_close(y[0, 0, 3, 1], expected)


@pytest.mark.parametrize(("route", "needs"), [case(r, n) for r in ("eager", "compiled") for n in ("both", "input", "weight")])
def test_rms_norm_matches_torch(route, needs, monkeypatch):
    take_route(route, monkeypatch)
    generator = torch.Generator().manual_seed(0)
    ours, reference = RMSNorm(16, eps=1e-5), nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(16, generator=generator) + 0.5)
        reference.weight.copy_(ours.weight)
    x = (3 * torch.randn(4, 5, 16, generator=generator)).requires_grad_(needs != "weight")
    grad_out = torch.randn(4, 5, 16, generator=generator)
    torch.testing.assert_close(ours(x), reference(x))

    def grads(module):
        inputs = {"both": [x, module.weight], "input": [x], "weight": [module.weight]}[needs]
        return torch.autograd.grad(module(x), inputs, grad_out)

    for got, want in zip(grads(ours), grads(reference), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("route", [case("eager"), case("compiled")])
def test_rms_norm_takes_strided_inputs_and_gradients(route, monkeypatch):
    """Transposed views in, as a caller may hand them (a permuted activation, a gradient that
    arrives transposed): the same values and gradients as torch's norm."""
    take_route(route, monkeypatch)
    generator = torch.Generator().manual_seed(1)
    ours, reference = RMSNorm(16, eps=1e-5), nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(16, generator=generator) + 0.5)
        reference.weight.copy_(ours.weight)
    x = torch.randn(5, 4, 16, generator=generator).transpose(0, 1).requires_grad_()
    grad_out = torch.randn(5, 4, 16, generator=generator).transpose(0, 1)
    got = torch.autograd.grad(ours(x), [x, ours.weight], grad_out)
    want = torch.autograd.grad(reference(x), [x, reference.weight], grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_rms_norm_in_other_dtypes_is_torch_composite():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(RMSNorm(8, eps=1e-6).double(), (x,))
    norm = RMSNorm(8, eps=1e-6).bfloat16()
    bf16 = torch.randn(3, 8).bfloat16()
    torch.testing.assert_close(norm(bf16), nn.functional.rms_norm(bf16, (8,), norm.weight, 1e-6))


@pytest.mark.parametrize(
    ("route", "activation", "dtype"),
    [case("eager", a, d) for a in ("silu", "gelu") for d in (torch.float32, torch.bfloat16)]
    + [case("compiled", "silu", torch.bfloat16), case("compiled", "gelu", torch.float32)],
)
def test_gated_activation_matches_the_formula(route, activation, dtype, monkeypatch):
    take_route(route, monkeypatch)
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 12, generator=generator).to(dtype).requires_grad_()
    h_ref = h.detach().clone().requires_grad_()
    grad_out = torch.randn(2, 5, 6, generator=generator).to(dtype)
    a, b = h_ref.chunk(2, dim=-1)
    y, y_ref = gated(h, activation), getattr(torch.nn.functional, activation)(a) * b
    assert y.dtype == dtype
    assert (y.grad_fn.backward_kernel is not None) == (route == "compiled")
    torch.testing.assert_close(y, y_ref)
    (grad,) = torch.autograd.grad(y, h, grad_out)
    (grad_ref,) = torch.autograd.grad(y_ref, h_ref, grad_out)
    torch.testing.assert_close(grad, grad_ref)
    if dtype == torch.float32:
        h64 = h.detach().double().requires_grad_()
        assert torch.autograd.gradcheck(lambda x: gated(x, activation), (h64,))


@pytest.mark.parametrize(
    ("route", "activation", "needs"),
    [case("eager", a, n) for a in ("silu", "gelu") for n in ("both", "input", "weight")]
    + [case("compiled", "silu", "both")],
)
def test_gated_linear_matches_one_matmul_and_the_formula(route, activation, needs, monkeypatch):
    """The two-matmul CPU route of a gated MLP's input projection: values and both gradients as
    the fused projection followed by ``act(a) * b``, whichever of input and weight wants one;
    the gate eager and compiled."""
    take_route(route, monkeypatch)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=generator).requires_grad_(needs != "weight")
    weight = (0.5 * torch.randn(12, 8, generator=generator)).requires_grad_(needs != "input")
    grad_out = torch.randn(3, 5, 6, generator=generator)
    a, b = torch.nn.functional.linear(x, weight).chunk(2, dim=-1)
    y, y_ref = gated_linear(x, weight, activation), getattr(torch.nn.functional, activation)(a) * b
    assert (y.grad_fn.backward_kernels is not None) == (route == "compiled")
    torch.testing.assert_close(y, y_ref)
    inputs = [t for t in (x, weight) if t.requires_grad]
    for got, want in zip(
        torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(y_ref, inputs, grad_out), strict=True
    ):
        torch.testing.assert_close(got, want)


@needs_a_compiler
@pytest.mark.parametrize("needs", ["all", "input", "weight", "bias"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gelu_tanh_matches_linear_then_gelu(needs, with_bias, monkeypatch):
    """The compiled CPU route of GPT-2's MLP input (matmul, then bias and tanh GELU in one kernel
    each way): the values and every gradient asked for, as ``F.linear`` then ``F.gelu``."""
    from scratchlm.kernels import compiled

    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1)  # small tensors take it too
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=generator).requires_grad_(needs in ("all", "input"))
    weight = (0.5 * torch.randn(12, 8, generator=generator)).requires_grad_(needs in ("all", "weight"))
    bias = torch.randn(12, generator=generator).requires_grad_(needs in ("all", "bias")) if with_bias else None
    if needs == "bias" and not with_bias:
        pytest.skip("no bias to differentiate")
    grad_out = torch.randn(3, 5, 12, generator=generator)
    y = linear_gelu(x, weight, bias, "tanh")
    assert type(y.grad_fn).__name__ == "_LinearBiasGeluTanhBackward"  # the compiled route ran
    y_ref = nn.functional.gelu(nn.functional.linear(x, weight, bias), approximate="tanh")
    torch.testing.assert_close(y, y_ref)
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    for got, want in zip(
        torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(y_ref, inputs, grad_out), strict=True
    ):
        torch.testing.assert_close(got, want)


@needs_a_compiler
@pytest.mark.parametrize("mlp", ["gelu_tanh", "swiglu"])
def test_mlp_backward_writes_over_its_activation_only_where_the_graph_is_freed(mlp, monkeypatch):
    """The compiled MLP routes write the activation's gradient over what they saved (SwiGLU's
    pre-activation, GELU's slope) when the backward frees the graph, and into a fresh buffer when
    it is retained: a second backward then still reads what was saved. Both give the reference
    gradients."""
    from scratchlm.models import layers

    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1)
    answers = []
    real = layers.frees_saved_tensors
    monkeypatch.setattr(layers, "frees_saved_tensors", lambda: answers.append(real()) or answers[-1])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=generator, requires_grad=True)
    weight = (0.5 * torch.randn(12, 8, generator=generator)).requires_grad_()
    if mlp == "gelu_tanh":
        bias = torch.randn(12, generator=generator, requires_grad=True)
        inputs, grad_out = [x, weight, bias], torch.randn(3, 5, 12, generator=generator)
        y = linear_gelu(x, weight, bias, "tanh")
        y_ref = nn.functional.gelu(nn.functional.linear(x, weight, bias), approximate="tanh")
    else:
        inputs, grad_out = [x, weight], torch.randn(3, 5, 6, generator=generator)
        y = gated_linear(x, weight, "silu")
        a, b = nn.functional.linear(x, weight).chunk(2, dim=-1)
        y_ref = nn.functional.silu(a) * b
    want = torch.autograd.grad(y_ref, inputs, grad_out)
    for retain in (True, True, False):
        for got, expected in zip(torch.autograd.grad(y, inputs, grad_out, retain_graph=retain), want, strict=True):
            torch.testing.assert_close(got, expected)
    assert answers == [False, False, True]


@needs_a_compiler
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gelu_tanh_under_bf16_autocast_matches_autocast_linear_then_gelu(with_bias, monkeypatch):
    """Under CPU bf16 autocast the compiled route takes the pre-activation in bf16 (the matmul in
    bf16, as autocast's F.linear) and the fp32 bias into its fp32 arithmetic: the output in bf16,
    the gradients of the fp32 parameters and input in fp32, all within bf16 rounding of autocast's
    F.linear then F.gelu."""
    from scratchlm.kernels import compiled

    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 32, generator=generator, requires_grad=True)
    weight = (0.3 * torch.randn(48, 32, generator=generator)).requires_grad_()
    bias = torch.randn(48, generator=generator).requires_grad_() if with_bias else None
    grad_out = torch.randn(4, 16, 48, generator=generator).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_gelu(x, weight, bias, "tanh")
        y_ref = nn.functional.gelu(nn.functional.linear(x, weight, bias), approximate="tanh")
    assert type(y.grad_fn).__name__ == "_LinearBiasGeluTanhBackward"
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=0.05, rtol=0.02)
    inputs = [t for t in (x, weight, bias) if t is not None]
    got, want = torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(y_ref, inputs, grad_out)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=0.05 * w.abs().max().item(), rtol=0.02)


@needs_a_compiler
def test_gelu_tanh_of_a_strided_tensor_matches_torch(monkeypatch):
    """T5's gate is a strided half of its fused projection."""
    from scratchlm.kernels import compiled

    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1)
    generator = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(4, 6, 20, generator=generator)).requires_grad_()
    gate = h.chunk(2, dim=-1)[0]
    grad_out = torch.randn(4, 6, 10, generator=generator)
    y, y_ref = gelu(gate, "tanh"), nn.functional.gelu(gate, approximate="tanh")
    assert type(y.grad_fn).__name__ == "_LinearBiasGeluTanhBackward"
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(torch.autograd.grad(y, h, grad_out)[0], torch.autograd.grad(y_ref, h, grad_out)[0])


@needs_a_compiler
def test_compiled_kernels_serve_every_batch_with_one_compile(monkeypatch):
    """Compiled for the model's widths with batch and length dynamic, and called outside autocast
    on detached tensors: after the first step, steps with other batch sizes and lengths, under
    bf16 autocast, with inputs that require gradients, compile nothing more."""
    from torch._dynamo.utils import counters

    from scratchlm.models.layers import rotary_split_heads

    take_route("compiled", monkeypatch)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=generator).requires_grad_()
    norm = RMSNorm(16, eps=1e-6)

    def step(batch, length):
        x = torch.randn(batch, length, 16, generator=generator, requires_grad=True)
        cos, sin = rope_cos_sin(torch.arange(length), 8, theta=10000.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = gated(nn.functional.linear(norm(x), weight), "silu")  # (B, T, 12): 3 heads of 4
            y = linear_gelu(x, weight, None, "tanh")
        q, k, v = rotary_split_heads(h.float().view(batch, length, 3, 4).repeat(1, 1, 1, 2), cos, sin, [1, 1, 1])
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        (out.sum() + y.float().sum()).backward()

    graphs, warm_ups = counters["stats"]["unique_graphs"], len(compiled._state["ready"])
    step(2, 8)
    # each warm-up compiles a forward and a backward at most (fewer where an earlier test's serve)
    assert counters["stats"]["unique_graphs"] - graphs <= 2 * (len(compiled._state["ready"]) - warm_ups)
    graphs = counters["stats"]["unique_graphs"]
    for batch, length in ((3, 8), (5, 11), (2, 8)):
        step(batch, length)
    assert counters["stats"]["unique_graphs"] == graphs


def test_gelu_tanh_falls_back_to_torch_once_when_compiling_fails(monkeypatch):
    """No C++ compiler (or any other compiler failure): one warning, then PyTorch's own kernel,
    with the same values, and no second attempt."""
    from scratchlm.kernels import compiled

    monkeypatch.setitem(compiled._state, "compiled", {})
    monkeypatch.setitem(compiled._state, "ready", set())
    monkeypatch.setitem(compiled._state, "failed", False)
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 1)
    attempts = []

    def failing_compile(fn, **kwargs):
        attempts.append(fn)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", failing_compile)
    x, weight, bias = torch.randn(2, 3, 4), torch.randn(6, 4), torch.randn(6)
    with pytest.warns(UserWarning, match="compiling the CPU GELU-tanh kernel failed.*no C\\+\\+ compiler"):
        y = linear_gelu(x, weight, bias, "tanh")
    torch.testing.assert_close(y, nn.functional.gelu(nn.functional.linear(x, weight, bias), approximate="tanh"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_gelu(x, weight.requires_grad_(), bias, "tanh").sum().backward()
    assert len(attempts) == 1


def test_small_tensors_never_start_the_compiler(monkeypatch):
    """Compiling costs seconds a process: tensors under ``MIN_ELEMENTS`` values (tests, toy
    models) keep PyTorch's kernels without asking for the compiled ones."""
    from scratchlm.kernels import compiled

    monkeypatch.setitem(compiled._state, "compiled", {})
    monkeypatch.setitem(compiled._state, "ready", set())
    monkeypatch.setitem(compiled._state, "failed", False)
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("the compiler was started"))
    x = torch.randn(4, 16, 32, requires_grad=True)  # output 4·16·64 = 4096 values
    y = linear_gelu(x, torch.randn(64, 32), torch.randn(64), "tanh")
    assert type(y.grad_fn).__name__ == "GeluBackward0"
    assert compiled.bias_gelu_tanh_kernels(1, compiled.MIN_ELEMENTS - 1, torch.float32, x.device) is None


def test_liger_swiglu_is_taken_on_cuda_only_and_gets_rows(monkeypatch):
    """``kernels.liger``: the kernel is offered for CUDA devices alone (so CPU training never takes
    it), and gets its input as 2-D rows and gives the output back in the input's shape (Liger's
    backward returns the gradient flattened to rows). A stand-in plays Liger, which needs a GPU."""
    from scratchlm.kernels import liger

    seen = []

    class FakeLiger(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            seen.append(tuple(h.shape))
            ctx.save_for_backward(h)
            a, b = h.chunk(2, dim=-1)
            return torch.nn.functional.silu(a) * b

        @staticmethod
        def backward(ctx, grad_y):
            (h,) = ctx.saved_tensors
            with torch.enable_grad():
                h = h.detach().requires_grad_()
                a, b = h.chunk(2, dim=-1)
                (grad,) = torch.autograd.grad(torch.nn.functional.silu(a) * b, h, grad_y)
            return grad.reshape(-1, h.shape[-1])

    monkeypatch.setattr(liger, "_swiglu_function", lambda: FakeLiger)
    h = torch.randn(2, 5, 12, requires_grad=True)
    assert liger.swiglu_kernel(torch.device("cpu")) is None
    gated(h, "silu")
    assert seen == []
    kernel = liger.swiglu_kernel(torch.device("cuda"))
    y = kernel(h)
    assert seen == [(10, 12)] and y.shape == (2, 5, 6)
    y.sum().backward()
    a, b = h.detach().chunk(2, dim=-1)
    torch.testing.assert_close(y, torch.nn.functional.silu(a) * b)
    assert h.grad.shape == h.shape


@pytest.mark.parametrize("autocast", [False, True])
def test_short_bf16_attention_on_cpu_runs_as_bf16_matmuls(autocast):
    """Up to CPU_BF16_MATMUL_MAX_QUERIES queries, eager bf16 attention on CPU is
    ``matmul_attention`` on the bf16 inputs (an fp32 float mask, as T5's position bias, added to
    fp32 scores), within bf16 rounding of the fp32 computation; from there on, plain SDPA."""
    import torch.nn.functional as F

    from scratchlm.models.layers import CPU_BF16_MATMUL_MAX_QUERIES, matmul_attention, sdpa

    generator = torch.Generator().manual_seed(0)
    for queries, expect_matmul in ((CPU_BF16_MATMUL_MAX_QUERIES, True), (CPU_BF16_MATMUL_MAX_QUERIES + 1, False)):
        q, k, v = (torch.randn(2, 3, queries, 8, generator=generator).bfloat16().requires_grad_() for _ in range(3))
        bias = torch.randn(1, 3, queries, queries, generator=generator).requires_grad_()  # fp32, as T5's
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = sdpa(q, k, v, attn_mask=bias, scale=1.0)
            plain = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        expected = matmul_attention(q, k, v, attn_mask=bias, scale=1.0) if expect_matmul else plain
        assert y.dtype == torch.bfloat16
        if expect_matmul:
            in_fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=1.0)
            torch.testing.assert_close(y.float(), in_fp32, rtol=0.02, atol=0.02)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        y.float().square().sum().backward()
        assert q.grad.dtype == torch.bfloat16 and k.grad.abs().sum() > 0
        assert bias.grad.dtype == torch.float32 and bias.grad.abs().sum() > 0


def test_short_bf16_attention_on_cpu_under_compile_computes_in_fp32(monkeypatch):
    """Where the matmul route is not taken (under torch.compile), bf16 attention below
    CPU_BF16_MIN_QUERIES queries is the fp32 computation rounded once."""
    import torch.nn.functional as F

    from scratchlm.models.layers import CPU_BF16_MIN_QUERIES, sdpa

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, CPU_BF16_MIN_QUERIES - 1, 8, generator=generator).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdpa(q, k, v, is_causal=True)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(y, expected.to(torch.bfloat16), rtol=0, atol=0)
