"""The GPU path: FlexAttention document masks with their backward, the fused loss under bf16
autocast, a real ``scratchlm fit`` in bf16 on the GPU, and training steps that never wait for it.

Every test here needs a CUDA device and is skipped without one (as on CI); ``benchmarks/gpu.sh``
runs them on a GPU machine. What CPU tests already prove (the dense masks, the loss on CPU) is
the reference each test compares with.
"""

from contextlib import contextmanager
import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm import train_tokenizer
from scratchlm.kernels import liger
from scratchlm.models import build_config, build_model
from scratchlm.models import layers
from scratchlm.objectives import cross_entropy
from scratchlm.objectives.cross_entropy import linear_cross_entropy
from scratchlm.training.callbacks import TokenThroughput

from runs import fit_recipe, mean_next_token_loss, zen_of_python
from steps import ARCH, Watched, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_batch(vocab: int, device: str = "cuda"):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (4, 256), generator=generator)
    doc_ids = torch.tensor([[0] * 100 + [1] * 120 + [2] * 36, [0] * 256, [0] * 40 + [1] * 216, [0] * 200 + [-1] * 56])
    return ids.to(device), doc_ids.to(device)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_flex_document_masks_match_the_dense_mask_forward_and_backward(family, monkeypatch):
    """On CUDA, document masks go through compiled FlexAttention; its outputs and every weight's
    gradient match the dense boolean mask through SDPA."""
    monkeypatch.setitem(layers._flex_state, "failed", False)
    compiled = layers._flex_state["compiled"] or torch.compile(layers.flex_attention, dynamic=False)
    calls = []
    monkeypatch.setitem(layers._flex_state, "compiled", lambda *a, **k: calls.append(1) or compiled(*a, **k))
    torch.manual_seed(0)
    # No dropout: attention with dropout takes dense SDPA, and the test would compare two draws.
    arch = {"n_layers": 2, "d_model": 128, "n_heads": 4, "d_ff": 256, "dropout": 0.0}
    if family == "llama":
        arch["n_kv_heads"] = 2
    model = build_model(family, build_config(family, "tiny", vocab_size=1000, **arch)).cuda()
    ids, doc_ids = packed_batch(1000)
    real = doc_ids >= 0

    def outputs_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(ids, doc_ids=doc_ids)
        (out[real].float().square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert isinstance(layers.build_attention_mask(None, causal=True, doc_ids=doc_ids, flex=True), layers.FlexMask)
    flex_out, flex_grads = outputs_and_grads()
    assert not layers._flex_state["failed"], "FlexAttention fell back to the dense mask"
    assert len(calls) == arch["n_layers"], f"{len(calls)} of {arch['n_layers']} layers went through FlexAttention"
    monkeypatch.setattr(layers, "FLEX_DEVICES", set())
    dense_out, dense_grads = outputs_and_grads()
    torch.testing.assert_close(flex_out[real], dense_out[real], atol=2e-5, rtol=2e-5)
    assert flex_grads.keys() == dense_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(flex_grads[name], dense_grads[name], atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("route", ["default", "eager"])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_linear_cross_entropy_matches_the_plain_route_on_cuda(autocast, route, monkeypatch):
    """The CUDA route (softmax chunks in the Triton kernel; under autocast the weight gradient
    summed in fp32 by a mixed-precision ``addmm``) and the eager one both give the plain route's
    loss and gradients."""
    if route == "eager":
        monkeypatch.setattr(cross_entropy, "TRITON_SOFTMAX", set())
        monkeypatch.setattr(cross_entropy, "MIXED_ADDMM", set())
    else:
        from scratchlm.kernels import triton_loss

        assert cross_entropy.fused_softmax_chunk("cuda", torch.float32) is triton_loss.softmax_rows
    torch.manual_seed(0)
    x = torch.randn(3000, 256, device="cuda", requires_grad=True)
    w = (torch.randn(5000, 256, device="cuda") * 0.05).requires_grad_()
    targets = torch.randint(5000, (3000,), device="cuda")
    targets[::7] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        fused, _ = linear_cross_entropy(x, w, None, targets, chunk_rows=1024)
        plain = F.cross_entropy(F.linear(x, w).float(), targets, ignore_index=-100)
    fused_grads = torch.autograd.grad(fused, (x, w))
    plain_grads = torch.autograd.grad(plain, (x, w))
    if route == "default":
        assert not cross_entropy._learnt["failed"], "the fused softmax chunk failed"
        assert cross_entropy._adds_mixed("cuda"), "this PyTorch has no mixed-precision addmm on CUDA"
    tolerance = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused, plain, **tolerance)
    for ours, theirs in zip(fused_grads, plain_grads):
        torch.testing.assert_close(ours, theirs, **tolerance)


def test_liger_swiglu_matches_the_hand_written_one():
    """With Liger-Kernel installed (the ``gpu`` extra), SwiGLU on CUDA runs its Triton kernel, and
    its output and gradient match the hand-written route's (bf16: within rounding)."""
    pytest.importorskip("liger_kernel")
    assert liger.swiglu_kernel(torch.device("cuda")) is not None
    generator = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4, 256, 2 * 96, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
    upstream = torch.randn(4, 256, 96, device="cuda", dtype=torch.bfloat16, generator=generator)
    results = []
    for route in (lambda t: layers.gated(t, "silu"), lambda t: layers._Gated.apply(t, "silu")):
        h.grad = None
        y = route(h)
        y.backward(upstream)
        results.append((y.detach().float(), h.grad.float()))
    (y_liger, grad_liger), (y_ours, grad_ours) = results
    torch.testing.assert_close(y_liger, y_ours, atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(grad_liger, grad_ours, atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fit_trains_on_the_gpu_in_mixed_precision(tmp_path, precision):
    """The command a GPU user runs, with the small recipes' gradient clipping: a short mixed-
    precision fit on the GPU learns (held-out loss well under a uniform guess) and writes an HF
    folder that transformers loads. (fp16's scaled gradients take an unfused AdamW, bf16's the
    fused one: tests/training/test_clipping.py.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, result = fit_recipe(
        "gpt2-tiny.yaml", tmp_path, "--trainer.accelerator", "gpu", "--trainer.precision", precision,
        "--trainer.gradient_clip_val", "1.0",
    )
    assert "GPU available: True (cuda), used: True" in result.stderr, result.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    loss = mean_next_token_loss(model, tokenizer, zen_of_python())
    assert loss < math.log(len(tokenizer)) - 1.0, f"held-out loss {loss:.2f} is near a uniform guess"


@contextmanager
def gpu_syncs_refused():
    """Inside the block, anything that makes the host wait for the GPU raises (CUDA's sync debug
    mode: ``item``, blocking copies either way, ``nonzero``, explicit synchronisation)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class GpuWatched(Watched):
    watch = staticmethod(gpu_syncs_refused)
    # Compiling synchronises: the first step compiles FlexAttention and the loss's Triton kernel.
    # The second is left unwatched as well, a margin for a compile on a batch of another shape
    # (MLM's masked rows differ in number from batch to batch).
    unwatched_steps = 2


@pytest.mark.parametrize("family, document_masks", [("gpt2", False), ("bert", False), ("llama", True)])
def test_the_training_step_never_waits_for_the_gpu(tmp_path, family, document_masks):
    """What ``tests/training/test_guard.py`` proves of Python-level reads on the CPU, on the GPU
    for every kind of synchronisation: the loss (with FlexAttention for document masks), backward,
    the non-finite guard with a poisoned batch, and the fused AdamW update, in bf16-mixed."""
    tokenizer = str(train_tokenizer(None, tmp_path / "tok", vocab_size=300, family=family))
    module = GpuWatched(
        tokenizer, family=family, arch=ARCH, poisoned={3}, max_bad_steps=2, document_masks=document_masks
    )
    fit(module, tokenizer, tmp_path, steps=6, callbacks=[TokenThroughput()], accelerator="gpu", devices=1,
        precision="bf16-mixed")
    assert module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
