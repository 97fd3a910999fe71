"""Training steps whose loss or gradients are not finite: skipped and counted on the device.

A NaN or inf that reached AdamW would poison the weights and both moments for good, so such a step
must not update anything. Deciding that on the host costs a device synchronisation every step
(reading ``isfinite`` back before the optimizer may run). Instead the decision stays a device
tensor: fused AdamW takes it as ``found_inf`` (the flag ``torch.amp.GradScaler`` hands it) and
skips the whole update, weight decay and step count included, on the device; the counters below
are read back only every few steps, when Lightning reads the logged metrics anyway.
"""

import torch


class NonFiniteGuard:
    """Device-side counters of bad steps: how many in all, and the longest run of bad steps in a
    row since training started (the current run is kept to count it)."""

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # int64 (skipped, current run, longest run)

    def update(self, bad: torch.Tensor) -> None:
        """Count one optimizer step; ``bad`` is a bool scalar on the training device."""
        bad = bad.long()
        if self._counts is None or self._counts.device != bad.device:
            self._counts = torch.zeros(3, dtype=torch.long, device=bad.device)
        skipped, run, longest = self._counts.unbind()
        run = (run + 1) * bad
        self._counts = torch.stack([skipped + bad, run, torch.maximum(longest, run)])

    def read(self) -> tuple[int, int]:
        """(skipped, longest run); waits for the device."""
        if self._counts is None:
            return 0, 0
        skipped, _, longest = self._counts.tolist()
        return skipped, longest
