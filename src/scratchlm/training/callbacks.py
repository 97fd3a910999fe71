"""Callbacks the CLI adds to every run."""

from collections import deque
import time

import lightning as L
import torch

from scratchlm.training.flops import flop_count

BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts), by a part of
the device name; the denominator of ``train/mfu``. Other devices log ``train/tflops`` only."""


def host_scalar(value: float) -> torch.Tensor:
    """A number for ``LightningModule.log`` that stays on the host. Lightning turns a Python number
    into a tensor on the module's device, and on a GPU that copy waits until all queued work is
    done (pytorch/pytorch#120996): one full synchronisation per logged number per step. Lightning
    keeps a metric on its value's device, so a CPU tensor is logged without one."""
    return torch.tensor(float(value), dtype=torch.float64)


class TokenThroughput(L.Callback):
    """Logs training tokens per second (``train/tok_s``, also on the progress bar), averaged over a
    window of recent batches so one slow step (a checkpoint, a validation pass) does not dominate,
    and the model FLOP/s they amount to (``train/tflops``; see ``training.flops``), with MFU
    (``train/mfu``) in bf16 on the GPUs in ``BF16_PEAK_FLOPS``.

    Tokens are counted from batch shapes across all ranks and logged as host tensors, so logging
    never synchronises with the device; on a GPU the window absorbs the lag between launching work
    and finishing it.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._tokens = 0
        self._flops_per_token: float | None = None
        self._peak: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._peak = device_peak(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        self._marks.append((time.perf_counter(), self._tokens))
        if self._flops_per_token is None:
            self._flops_per_token = flops_per_token(pl_module, batch)
        if len(self._marks) < 2:
            return
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        tokens_per_second = (n1 - n0) / max(t1 - t0, 1e-9)
        pl_module.log("train/tok_s", host_scalar(tokens_per_second), prog_bar=True)
        if self._flops_per_token:
            flops = tokens_per_second * self._flops_per_token  # all ranks together
            pl_module.log("train/tflops", host_scalar(flops / 1e12))
            if self._peak:
                pl_module.log("train/mfu", host_scalar(flops / (self._peak * trainer.world_size)))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._marks.clear()  # validation time is not training time


def flops_per_token(pl_module, batch: dict) -> float:
    """Training FLOPs per token that ``train/tok_s`` counts (the ``input_ids`` of a batch) for the
    module's model and objective. An encoder-decoder's count is put on the scale of its encoder
    positions: S of them answered with T decoder positions."""
    model = pl_module.model
    length = batch["input_ids"].shape[-1]
    if getattr(model, "is_encoder_decoder", False):
        lengths = (length, batch["decoder_input_ids"].shape[-1])
        return flop_count(model, pl_module.objective.name, length, 1.0, lengths=lengths).per_token
    masking = getattr(pl_module.objective, "masking", None)
    mask_rate = masking.mask_rate if masking is not None else 1.0
    return flop_count(model, pl_module.objective.name, length, mask_rate).per_token


def device_peak(trainer) -> float | None:
    """The bf16 peak of the GPU this run trains on in bf16, where known."""
    if not torch.cuda.is_available() or "bf16" not in str(trainer.precision):
        return None
    name = torch.cuda.get_device_name(trainer.strategy.root_device)
    return next((peak for part, peak in BF16_PEAK_FLOPS.items() if part in name), None)
