"""Non-finite losses and gradients: skipped and counted, and a run that keeps producing them stops;
the training step itself never reads a value back from the device to decide it."""

import re

import pytest
import torch

from scratchlm import ScratchLMError, train_tokenizer
from scratchlm.training import optim
from scratchlm.training.callbacks import TokenThroughput

from steps import ARCH, Poisoned, Watched, fit, nan_gradient, no_host_reads


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(train_tokenizer(None, tmp_path_factory.mktemp("guard") / "tok", vocab_size=300, family="gpt2"))


@pytest.fixture(params=["fused", "per-tensor"])
def adamw(request, monkeypatch):
    """Both of the guard's routes: fused AdamW skips on the device, any other AdamW gets its
    grads cleared."""
    if request.param == "per-tensor":
        monkeypatch.setattr(optim, "FUSED_DEVICES", ())
    return request.param


def test_nonfinite_losses_are_skipped_and_leave_the_weights_alone(tokenizer, tmp_path, adamw):
    module = Poisoned(tokenizer, family="gpt2", arch=ARCH, poisoned={2, 3, 4})
    trainer = fit(module, tokenizer, tmp_path, steps=8)
    assert trainer.optimizers[0].defaults["fused"] == (adamw == "fused")
    assert module.skipped_steps == 3
    assert module.untouched == [True, True, True]  # weight decay included
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # AdamW counts the updates it applied to each parameter: the poisoned batches made none.
    state = trainer.optimizers[0].state
    assert {int(state[p]["step"]) for p in module.parameters()} == {5}


def test_a_run_that_stays_nonfinite_stops_with_a_checkpoint(tokenizer, tmp_path):
    module = Poisoned(tokenizer, family="gpt2", arch=ARCH, poisoned=set(range(2, 100)), max_bad_steps=3)
    with pytest.raises(ScratchLMError, match=r"not finite for (\d+) steps in a row") as error:
        fit(module, tokenizer, tmp_path, steps=50)
    # Read every max_bad_steps steps: stopped within 3 steps of the fourth bad one in a row.
    assert 4 <= int(re.search(r"for (\d+) steps", str(error.value)).group(1)) <= 6
    saved = list((tmp_path / "checkpoints").glob("nonfinite-*.ckpt"))
    assert len(saved) == 1 and str(saved[0]) in str(error.value)


def test_nonfinite_gradients_skip_the_update(tokenizer, tmp_path, adamw):
    module = Poisoned(tokenizer, family="gpt2", arch=ARCH, poisoned={1, 2}, poison=nan_gradient)
    trainer = fit(module, tokenizer, tmp_path, steps=6)
    assert module.skipped_steps == 2
    assert module.untouched == [True, True]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    state = trainer.optimizers[0].state
    assert {int(state[p]["step"]) for p in module.parameters()} == {4}


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_the_training_step_never_waits_for_the_device(tmp_path, family):
    with no_host_reads(), pytest.raises(AssertionError, match="read on the host"):
        bool(torch.ones(()))  # the watch itself works
    tokenizer = str(train_tokenizer(None, tmp_path / "tok", vocab_size=300, family=family))
    module = Watched(tokenizer, family=family, arch=ARCH, poisoned={2}, max_bad_steps=2)
    fit(module, tokenizer, tmp_path, steps=5, callbacks=[TokenThroughput()])
    assert module.skipped_steps == 1
    assert {"train/loss", "train/lr", "train/tok_s", "train/tflops", "train/skipped_steps"} <= module.logged
