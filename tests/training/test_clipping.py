"""``--trainer.gradient_clip_val`` under every precision: Lightning's mixed-precision plugin refuses
to clip for a fused optimizer, which ours is; the module clips itself where nothing is scaled
(bf16, fp32) and leaves fp16's scaled gradients to Lightning with an unfused AdamW."""

import lightning as L
import pytest
import torch

from scratchlm import PretrainModule, train_tokenizer

from steps import ARCH, fit


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(train_tokenizer(None, tmp_path_factory.mktemp("clip") / "tok", vocab_size=300, family="gpt2"))


class GradNorms(L.Callback):
    """The total gradient norm the optimizer stepped with, each step (grads stay until the next
    step's zeroing; fused AdamW leaves them as they were)."""

    def __init__(self) -> None:
        self.norms = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(torch.nn.utils.get_total_norm(grads).item())


@pytest.mark.parametrize("precision, fused", [("bf16-mixed", True), ("32-true", True), ("scaled", False)])
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradients_are_clipped_under_every_precision(tokenizer, tmp_path, monkeypatch, precision, fused, algorithm):
    """"scaled" stands for fp16 with its GradScaler, which runs on GPUs only (Lightning turns
    16-mixed into bf16-mixed on CPU): the module's route for it, with Lightning doing the clip
    (tests/test_cuda.py runs the real one)."""
    if precision == "scaled":
        monkeypatch.setattr(PretrainModule, "scaled_gradients", lambda self: True)
        precision = "32-true"
    module = PretrainModule(tokenizer, family="gpt2", arch=ARCH)
    norms = GradNorms()
    trainer = fit(module, tokenizer, tmp_path, steps=3, callbacks=[norms], precision=precision,
                  gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm)
    assert trainer.optimizers[0].defaults["fused"] == fused
    assert len(norms.norms) == 3
    if algorithm == "norm":
        assert all(norm <= 1e-3 * 1.01 for norm in norms.norms), norms.norms
    else:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert max(g.abs().max().item() for g in grads) <= 1e-3 * 1.01


def test_without_clipping_the_gradients_are_left_alone(tokenizer, tmp_path):
    """The check above can fail: unclipped, these gradients are far above the clip value."""
    module = PretrainModule(tokenizer, family="gpt2", arch=ARCH)
    norms = GradNorms()
    fit(module, tokenizer, tmp_path, steps=2, callbacks=[norms], precision="bf16-mixed")
    assert min(norms.norms) > 1e-2


class LoggedNorms(L.Callback):
    """``train/grad_norm`` as logged, each step."""

    def __init__(self) -> None:
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/grad_norm"]))


def test_the_logged_gradient_norm_is_the_one_before_clipping(tokenizer, tmp_path):
    """Clipping reuses the norm the step logs; the log shows what the gradients were, the
    optimizer gets them clipped."""
    unclipped, clipped = GradNorms(), GradNorms()
    logged = LoggedNorms()
    for root, callbacks, clip in [("a", [unclipped], None), ("b", [clipped, logged], 1e-3)]:
        torch.manual_seed(0)
        fit(PretrainModule(tokenizer, family="gpt2", arch=ARCH), tokenizer, tmp_path / root, steps=1,
            callbacks=callbacks, gradient_clip_val=clip)
    assert logged.values[0] == pytest.approx(unclipped.norms[0], rel=1e-4)  # the same first batch and weights
    assert clipped.norms[0] == pytest.approx(1e-3, rel=1e-3) and logged.values[0] > 1e-2
