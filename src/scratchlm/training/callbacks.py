"""Callbacks the CLI adds to every run."""

from collections import deque
import time

import lightning as L


class TokenThroughput(L.Callback):
    """Logs training tokens per second (``train/tok_s``, also on the progress bar), averaged over a
    window of recent batches so one slow step (a checkpoint, a validation pass) does not dominate.

    Tokens are counted from batch shapes across all ranks, so logging never synchronises with the
    device; on a GPU the window absorbs the lag between launching work and finishing it.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        self._marks.append((time.perf_counter(), self._tokens))
        if len(self._marks) < 2:
            return
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        pl_module.log("train/tok_s", (n1 - n0) / max(t1 - t0, 1e-9), prog_bar=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._marks.clear()  # validation time is not training time
