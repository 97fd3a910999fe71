"""Training-step helpers shared by the guard tests (CPU) and the GPU tests: a module whose chosen
batches get a non-finite loss, and one whose own parts of every step run under a watch for
anything that would make the host wait for the device."""

from contextlib import contextmanager
import functools

import lightning as L
import torch

from scratchlm import PretrainModule, TextDataModule

ARCH = {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64}


def nan_loss(loss, model):
    return loss * float("nan")


def nan_gradient(loss, model):
    """Same (finite) loss, but d sqrt(x)/dx at x = 0 is infinite: the backward pass overflows."""
    weight = next(model.parameters())
    return loss + torch.sqrt(weight.sum() * 0.0)


class Poisoned(PretrainModule):
    """Poisons the loss on the chosen (0-based) training batches, and records for each of them
    whether every parameter came out of its step bit for bit as it went in (``untouched``)."""

    def __init__(self, *args, poisoned: set[int], poison=nan_loss, **kwargs):
        super().__init__(*args, **kwargs)
        self.poisoned = poisoned
        self.poison = poison
        self.batches = 0
        self.untouched: list[bool] = []
        self._before: list[torch.Tensor] | None = None

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        poisoned = self.batches in self.poisoned
        self._before = [p.detach().clone() for p in self.parameters()] if poisoned else None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self._before is not None:
            self.untouched.append(all(torch.equal(a, p) for a, p in zip(self._before, self.parameters())))

    def training_step(self, batch, batch_idx):
        original = self.objective.loss
        if self.batches in self.poisoned:
            self.objective.loss = lambda model, b: (self.poison(original(model, b)[0], model), {})
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self.objective.loss = original
            self.batches += 1


def fit(module, tokenizer, root, steps, callbacks=(), **trainer_args):
    data = TextDataModule(tokenizer=tokenizer, block_size=32, batch_size=4, val_fraction=0)
    trainer_args = {"accelerator": "cpu", **trainer_args}
    trainer = L.Trainer(
        max_steps=steps, default_root_dir=root, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **trainer_args,
    )
    trainer.fit(module, data)
    return trainer


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


def watched(method):
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        if self.global_step < self.unwatched_steps:
            return method(self, *args, **kwargs)
        with self.watch():
            return method(self, *args, **kwargs)

    return wrapped


class Watched(Poisoned):
    """Every part of a training step that is ours runs under ``watch``: the loss, the backward
    pass, the guard and the optimizer's update (Lightning's code between them does not), from
    step ``unwatched_steps`` on. Nothing logs a Python number either: Lightning would copy it
    into a new device tensor, and on a GPU that copy waits for the device."""

    watch = staticmethod(no_host_reads)
    unwatched_steps = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logged = set()

    def log(self, name, value, *args, **kwargs):
        assert isinstance(value, torch.Tensor), f"{name} logged as a Python {type(value).__name__}"
        self.logged.add(name)
        super().log(name, value, *args, **kwargs)

    training_step = watched(Poisoned.training_step)
    backward = watched(Poisoned.backward)
    on_before_optimizer_step = watched(Poisoned.on_before_optimizer_step)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The update alone under the watch: the closure (training_step, backward and the hook
        before the update, each watched above) runs first, outside it."""
        raw = getattr(optimizer, "optimizer", optimizer)  # under Lightning's wrapper
        before = raw.__dict__.get("step")  # the LR scheduler's own wrapper, if any
        update = raw.step

        @watched
        def step_alone(module, **kwargs):
            return update(**kwargs)

        def step(closure=None, **kwargs):
            loss = closure() if closure is not None else None
            step_alone(self, **kwargs)
            return loss

        raw.step = step
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            if before is None:
                del raw.step
            else:
                raw.step = before
