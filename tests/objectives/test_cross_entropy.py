"""The fused, chunked linear cross-entropy equals the plain route: loss and every gradient."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from scratchlm.models import build_config, build_model
from scratchlm.objectives.cross_entropy import linear_cross_entropy, vocab_cross_entropy

N, D, V = 37, 16, 50


def inputs(bias: bool, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, D, generator=generator, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=generator, dtype=dtype).requires_grad_()
    bias_V = torch.randn(V, generator=generator, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[::5] = -100  # unscored rows
    return features, weight, bias_V, targets


def plain(features, weight, bias_V, targets):
    return F.cross_entropy(F.linear(features, weight, bias_V).float(), targets, ignore_index=-100)


def loss_and_grads(loss_fn, features, weight, bias_V, targets, scale: float = 1.0):
    leaves = [t for t in (features, weight, bias_V) if t is not None]
    loss = loss_fn(features, weight, bias_V, targets)
    grads = torch.autograd.grad(loss * scale, leaves)
    return loss.detach(), grads


def fused(chunk_rows: int):
    return lambda *args: linear_cross_entropy(*args, chunk_rows=chunk_rows)[0]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 8, 10, N, 1000])
def test_equals_plain_cross_entropy(bias, chunk_rows):
    args = inputs(bias)
    loss, grads = loss_and_grads(fused(chunk_rows), *args, scale=3.0)
    loss_ref, grads_ref = loss_and_grads(plain, *args, scale=3.0)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_backward_with_the_graph_kept_or_freed_gives_the_same_gradients():
    """Backward scales its stored gradients in place only where the graph is freed after:
    backwards through a kept graph, at any scale, then the last one through it, all give the
    plain route's gradients."""
    args = inputs(bias=True)
    leaves = list(args[:3])
    loss = fused(8)(*args)
    loss_ref = plain(*args)
    for scale, keep in [(1.0, True), (2.0, True), (1.0, True), (1.0, False)]:
        got = torch.autograd.grad(loss * scale if scale != 1.0 else loss, leaves, retain_graph=keep)
        want = torch.autograd.grad(loss_ref * scale, leaves, retain_graph=True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_double():
    features, weight, bias_V, targets = inputs(bias=True, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f, w, b: linear_cross_entropy(f, w, b, targets, chunk_rows=7)[0], (features, weight, bias_V)
    )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vocab_multiple", [8, 64])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_padded_vocabulary_changes_nothing(bias, vocab_multiple, autocast):
    """The vocabulary padded for aligned matmuls (as on CUDA): loss, accuracy and every gradient
    are those of the real vocabulary, also in bf16 and with the padding inside a chunk."""
    args = inputs(bias)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):

        def padded(*a):
            return linear_cross_entropy(*a, chunk_rows=10, vocab_multiple=vocab_multiple)[0]

        loss, grads = loss_and_grads(padded, *args)
        loss_ref, grads_ref = loss_and_grads(fused(10), *args)
        accuracy = linear_cross_entropy(*args, chunk_rows=10, vocab_multiple=vocab_multiple)[1]
        accuracy_ref = linear_cross_entropy(*args, chunk_rows=10)[1]
    assert accuracy == accuracy_ref
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_ref, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradcheck_with_a_padded_vocabulary():
    features, weight, bias_V, targets = inputs(bias=False, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f, w: linear_cross_entropy(f, w, None, targets, chunk_rows=7, vocab_multiple=64)[0], (features, weight)
    )


def test_without_grad_only_the_loss():
    features, weight, bias_V, targets = inputs(bias=True)
    with torch.no_grad():
        loss, _ = linear_cross_entropy(features, weight, bias_V, targets, chunk_rows=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain(features, weight, bias_V, targets).detach())


def test_only_some_inputs_need_grad():
    features, weight, _, targets = inputs(bias=False)
    frozen = weight.detach()
    (grad,) = torch.autograd.grad(fused(6)(features, frozen, None, targets), [features])
    (grad_ref,) = torch.autograd.grad(plain(features, frozen, None, targets), [features])
    torch.testing.assert_close(grad, grad_ref)


def test_nothing_scored_is_nan_like_torch():
    features, weight, _, targets = inputs(bias=False)
    targets[:] = -100
    assert plain(features, weight, None, targets).isnan()
    loss, accuracy = linear_cross_entropy(features, weight, None, targets)
    assert loss.isnan() and accuracy == 0


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("chunk_rows", [8, N])
def test_softmax_blocks_inside_a_chunk_change_nothing(autocast, chunk_rows, monkeypatch):
    """Blocks of 3 rows (the last one shorter) inside chunks of 8 or all rows: the same loss,
    accuracy and gradients as one block per chunk."""
    from scratchlm.objectives import cross_entropy

    args = inputs(bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        whole, grads_whole = loss_and_grads(fused(chunk_rows), *args)
        accuracy_whole = linear_cross_entropy(*args, chunk_rows=chunk_rows)[1]
        monkeypatch.setitem(cross_entropy.SOFTMAX_BYTES, "cpu", 3 * 4 * V)
        blocked, grads_blocked = loss_and_grads(fused(chunk_rows), *args)
        accuracy_blocked = linear_cross_entropy(*args, chunk_rows=chunk_rows)[1]
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    assert accuracy_blocked == accuracy_whole
    for got, want in zip(grads_blocked, grads_whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if not autocast:
        loss_ref, grads_ref = loss_and_grads(plain, *args)
        torch.testing.assert_close(blocked, loss_ref, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads_blocked, grads_ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_follows_the_plain_route():
    features, weight, bias_V, targets = inputs(bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(fused(8), features, weight, bias_V, targets)
        loss_ref, grads_ref = loss_and_grads(plain, features, weight, bias_V, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, grads_ref, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "modernbert", "modernbert-causal", "t5", "bart"])
def test_every_model_fuses_its_own_head(family):
    """``vocab_projection`` is the model's head: the fused loss equals cross-entropy of
    ``model.logits``, with the same gradient on every parameter (tied tables included)."""
    torch.manual_seed(0)
    model = build_model(family, build_config(family, "tiny", vocab_size=V, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    hidden = torch.randn(N, 32, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    params = [hidden, *model.parameters()]

    loss, _ = vocab_cross_entropy(model, hidden, targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    reference = F.cross_entropy(model.logits(hidden).float(), targets)
    grads_ref = torch.autograd.grad(reference, params, allow_unused=True)

    torch.testing.assert_close(loss, reference)
    for got, want in zip(grads, grads_ref, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_accuracy_is_the_share_of_scored_rows_predicted(chunk_rows):
    features, weight, bias_V, targets = inputs(bias=True)
    logits = F.linear(features, weight, bias_V)
    targets[1::3] = logits.argmax(-1)[1::3]  # a third of the rows right for sure
    scored = targets != -100
    expected = ((logits.argmax(-1) == targets) & scored).sum() / scored.sum()
    assert 0.3 < expected < 1
    _, accuracy = linear_cross_entropy(features, weight, bias_V, targets, chunk_rows=chunk_rows)
    torch.testing.assert_close(accuracy, expected)


def test_chunks_keep_enough_rows_for_large_vocabularies(monkeypatch):
    """Each chunk pays a pass over the whole weight gradient, so a large vocabulary must not shrink
    chunks to a few rows: the byte budget decides for small vocabularies only."""
    from scratchlm.objectives import cross_entropy

    assert cross_entropy.default_chunk_rows("cpu", 8192, low_precision=False) == 512
    assert cross_entropy.default_chunk_rows("cpu", 50257, low_precision=False) == 512
    assert cross_entropy.default_chunk_rows("cpu", 50257, low_precision=True) == 512
    assert cross_entropy.default_chunk_rows("cpu", 1000, low_precision=False) == (4 << 20) // 4000
    assert cross_entropy.default_chunk_rows("cuda", 50257, low_precision=True) == (1 << 30) // (4 * 50257)
    assert cross_entropy.default_chunk_rows("xpu", 50257, low_precision=True) == (256 << 20) // (4 * 50257)
    # The call without chunk_rows uses the floor of its precision (the fp32 one set apart here).
    monkeypatch.setitem(cross_entropy.MIN_CHUNK_ROWS, "fp32", 300)
    seen = []
    original = cross_entropy._chunked
    monkeypatch.setattr(cross_entropy, "_chunked", lambda *args: seen.append(args[5]) or original(*args))
    features, weight = torch.randn(600, 8), torch.randn(50257, 8)
    targets = torch.randint(50257, (600,))
    cross_entropy.linear_cross_entropy(features, weight, None, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cross_entropy.linear_cross_entropy(features, weight, None, targets)
    assert seen == [300, 512]


def fused_route_against_blocks(args, autocast: bool, vocab_multiple: int, monkeypatch):
    """(loss, accuracy, grads) of the default route, then of the whole-chunk route of a device in
    ``TRITON_SOFTMAX`` with ``softmax_chunk``, the kernel's spec, standing in for the kernel."""
    from scratchlm.objectives import cross_entropy

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, accuracy = linear_cross_entropy(*args, chunk_rows=8, vocab_multiple=vocab_multiple)
        leaves = [t for t in args[:3] if t is not None]
        return loss.detach(), accuracy, torch.autograd.grad(loss, leaves)

    blocks = run()
    monkeypatch.setattr(cross_entropy, "fused_softmax_chunk", lambda device, dtype: cross_entropy.softmax_chunk)
    return blocks, run()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vocab_multiple", [1, 64])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_fused_softmax_chunk_changes_nothing(bias, vocab_multiple, autocast, monkeypatch):
    """The route of a device in ``TRITON_SOFTMAX`` (the softmax work of whole chunks at once):
    the loss, accuracy and gradients of the eager blocks, padded vocabulary too."""
    (loss, accuracy, grads), (loss_f, accuracy_f, grads_f) = fused_route_against_blocks(
        inputs(bias), autocast, vocab_multiple, monkeypatch
    )
    tolerance = {"rtol": 2e-2, "atol": 1e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}  # bf16 gradients
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=1e-6)
    assert accuracy_f == accuracy
    for got, want in zip(grads_f, grads, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


TRITON_CHECK = """
import torch
import torch.nn.functional as F
from scratchlm.kernels import triton_loss
from scratchlm.objectives import cross_entropy
from scratchlm.objectives.cross_entropy import softmax_chunk

generator = torch.Generator().manual_seed(0)
for dtype, atol in ((torch.float32, 1e-7), (torch.bfloat16, 1 / 256)):
    logits = (torch.randn(9, 700, generator=generator) * 4).to(dtype)
    logits[:, -6:] = float("-inf")
    targets = torch.randint(694, (9, 1), generator=generator)
    weights = torch.rand(9, 1, generator=generator)
    want_logits, got_logits, untouched = logits.clone(), logits.clone(), logits.clone()
    want = softmax_chunk(want_logits, targets, weights)
    got = triton_loss.softmax_rows(got_logits, targets, weights, block=256, warps=1)
    without_grad = triton_loss.softmax_rows(untouched, targets, None, block=256, warps=1)
    for result in (got, without_grad):
        torch.testing.assert_close(result[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(result[1], want[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=atol)
    assert torch.equal(untouched, logits)

# The whole loss through the kernel, in chunks that start at unaligned rows, against the plain route.
cross_entropy.TRITON_SOFTMAX.add("cpu")
assert cross_entropy.fused_softmax_chunk("cpu", torch.float32) is triton_loss.softmax_rows
x = torch.randn(301, 32, generator=generator, requires_grad=True)
w = (torch.randn(700, 32, generator=generator) * 0.1).requires_grad_()
targets = torch.randint(700, (301,), generator=generator)
targets[::5] = -100
for vocab_multiple in (1, 64):
    fused, _ = cross_entropy.linear_cross_entropy(x, w, None, targets, chunk_rows=97, vocab_multiple=vocab_multiple)
    plain = F.cross_entropy(F.linear(x, w), targets)
    torch.testing.assert_close(fused, plain)
    for got, want in zip(torch.autograd.grad(fused, (x, w)), torch.autograd.grad(plain, (x, w))):
        torch.testing.assert_close(got, want)
assert not cross_entropy._learnt["failed"]
print("ok")
"""


def test_the_triton_softmax_kernel_matches_its_spec():
    """``kernels.triton_loss``'s kernel gives ``softmax_chunk``'s results and writes its gradient,
    fp32 and bf16, over rows longer than a block and a padded vocabulary's -inf columns; the
    whole loss through it gives the plain route's loss and gradients. Run by
    Triton's interpreter on CPU, in a process of its own (the interpreter must be chosen before
    Triton is first imported); skipped where Triton is not installed, as with PyTorch's CPU builds."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_rows_are_shared_evenly_between_chunks(monkeypatch):
    """13 rows in chunks of at most 8 go as 7 and 6 (two chunks either way, neither of them small)."""
    from scratchlm.objectives import cross_entropy

    sizes = []
    block = cross_entropy.softmax_block
    monkeypatch.setattr(cross_entropy, "softmax_block", lambda logits, *rest: sizes.append(len(logits)) or block(logits, *rest))
    features, weight, targets = torch.randn(13, 8), torch.randn(20, 8), torch.randint(20, (13,))
    linear_cross_entropy(features, weight, None, targets, chunk_rows=8)
    assert sizes == [7, 6]


def test_the_triton_kernel_is_taken_only_where_it_can_run(monkeypatch):
    """A device in ``TRITON_SOFTMAX`` with Triton installed and an fp32 softmax takes the kernel;
    the CPU by default, a missing Triton and fp64 (gradcheck) keep the eager blocks."""
    from scratchlm import kernels
    from scratchlm.objectives import cross_entropy

    assert cross_entropy.fused_softmax_chunk("cpu", torch.float32) is None
    monkeypatch.setattr(cross_entropy, "TRITON_SOFTMAX", {"cpu"})
    stand_in = SimpleNamespace(AVAILABLE=True, softmax_rows=lambda *args: None)
    monkeypatch.setattr(kernels, "triton_loss", stand_in, raising=False)
    assert cross_entropy.fused_softmax_chunk("cpu", torch.float32) is stand_in.softmax_rows
    assert cross_entropy.fused_softmax_chunk("cpu", torch.float64) is None
    stand_in.AVAILABLE = False
    assert cross_entropy.fused_softmax_chunk("cpu", torch.float32) is None


def test_a_fused_softmax_chunk_that_fails_falls_back_with_one_warning(monkeypatch):
    """Where the kernel fails to compile (a GPU Triton does not support), the loss warns once,
    gives the eager route's results, and does not try the kernel again in the process (the CPU
    and a stand-in kernel module playing the GPU and Triton's)."""
    from scratchlm import kernels
    from scratchlm.objectives import cross_entropy

    attempts = []

    def broken(*args):
        attempts.append(1)
        raise RuntimeError("no compiler for this device\nmore detail")

    args = inputs(bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear_cross_entropy(*args, chunk_rows=8)
    monkeypatch.setattr(cross_entropy, "TRITON_SOFTMAX", {"cpu"})
    monkeypatch.setattr(kernels, "triton_loss", SimpleNamespace(AVAILABLE=True, softmax_rows=broken), raising=False)
    monkeypatch.setitem(cross_entropy._learnt, "failed", False)
    with pytest.warns(UserWarning, match="the loss's fused softmax chunk failed on cpu .RuntimeError: no compiler for this device.") as caught:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = linear_cross_entropy(*args, chunk_rows=8)
            again = linear_cross_entropy(*args, chunk_rows=8)
    assert len(caught) == 1 and len(attempts) == 1
    for result in (got, again):
        torch.testing.assert_close(result[0], want[0], rtol=0, atol=0)
        assert result[1] == want[1]


def test_a_device_without_the_mixed_addmm_widens_each_chunk(monkeypatch):
    """A device named in ``MIXED_ADDMM`` whose PyTorch cannot run it there (the CPU: the overload
    is CUDA's) is found out once and takes the widening route, with its results."""
    from scratchlm.objectives import cross_entropy

    args = inputs(bias=False)

    def grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = linear_cross_entropy(*args, chunk_rows=8)
        return torch.autograd.grad(loss, args[:2])

    want = grads()
    monkeypatch.setattr(cross_entropy, "MIXED_ADDMM", {"cpu"})
    monkeypatch.setitem(cross_entropy._learnt, "mixed_addmm", {})
    got = grads()
    assert cross_entropy._learnt["mixed_addmm"] == {"cpu": False}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
