"""Non-finite losses and gradients: skipped and counted, and a run that keeps producing them stops;
the training step itself never reads a value back from the device to decide it."""

from contextlib import contextmanager
import functools
import re

import lightning as L
import pytest
import torch

from scratchlm import PretrainModule, ScratchLMError, TextDataModule, train_tokenizer
from scratchlm.training import optim
from scratchlm.training.callbacks import TokenThroughput


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(train_tokenizer(None, tmp_path_factory.mktemp("guard") / "tok", vocab_size=300, family="gpt2"))


def nan_loss(loss, model):
    return loss * float("nan")


def nan_gradient(loss, model):
    """Same (finite) loss, but d sqrt(x)/dx at x = 0 is infinite: the backward pass overflows."""
    weight = next(model.parameters())
    return loss + torch.sqrt(weight.sum() * 0.0)


class Poisoned(PretrainModule):
    """Poisons the loss on the chosen (0-based) training batches."""

    def __init__(self, *args, poisoned: set[int], poison=nan_loss, **kwargs):
        super().__init__(*args, **kwargs)
        self.poisoned = poisoned
        self.poison = poison
        self.batches = 0

    def training_step(self, batch, batch_idx):
        original = self.objective.loss
        if self.batches in self.poisoned:
            self.objective.loss = lambda model, b: (self.poison(original(model, b)[0], model), {})
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self.objective.loss = original
            self.batches += 1


def fit(module, tokenizer, root, steps, callbacks=()):
    data = TextDataModule(tokenizer=tokenizer, block_size=32, batch_size=4, val_fraction=0)
    trainer = L.Trainer(
        max_steps=steps, default_root_dir=root, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", callbacks=list(callbacks),
    )
    trainer.fit(module, data)
    return trainer


ARCH = {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64}


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
    assert all(torch.isfinite(p).all() for p in module.parameters())
    state = trainer.optimizers[0].state
    assert {int(state[p]["step"]) for p in module.parameters()} == {4}


@contextmanager
def no_host_reads():
    """Any read of a tensor's value into Python (what waits for a GPU) raises inside the block."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host inside the training step")

    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    for name in names:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def without_host_reads(method):
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with no_host_reads():
            return method(*args, **kwargs)

    return wrapped


class Watched(Poisoned):
    """Every part of a training step that is ours runs under ``no_host_reads``: the loss, the
    backward pass, the guard and the AdamW update. Nothing logs a Python number either: Lightning
    would copy it into a new device tensor, and on a GPU that copy waits for the device."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logged = set()

    def log(self, name, value, *args, **kwargs):
        assert isinstance(value, torch.Tensor), f"{name} logged as a Python {type(value).__name__}"
        self.logged.add(name)
        super().log(name, value, *args, **kwargs)

    training_step = without_host_reads(Poisoned.training_step)
    backward = without_host_reads(Poisoned.backward)
    on_before_optimizer_step = without_host_reads(Poisoned.on_before_optimizer_step)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step = without_host_reads(optimizer.step)
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            del optimizer.step


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_the_training_step_never_waits_for_the_device(tmp_path, family):
    with no_host_reads(), pytest.raises(AssertionError, match="read on the host"):
        bool(torch.ones(()))  # the watch itself works
    tokenizer = str(train_tokenizer(None, tmp_path / "tok", vocab_size=300, family=family))
    module = Watched(tokenizer, family=family, arch=ARCH, poisoned={2}, max_bad_steps=2)
    fit(module, tokenizer, tmp_path, steps=5, callbacks=[TokenThroughput()])
    assert module.skipped_steps == 1
    assert {"train/loss", "train/lr", "train/tok_s", "train/tflops", "train/skipped_steps"} <= module.logged
