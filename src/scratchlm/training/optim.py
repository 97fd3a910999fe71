"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules."""

from dataclasses import dataclass
import math
from typing import Literal

import torch
from torch import nn

from scratchlm.errors import ScratchLMError


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.01
    """Decoupled weight decay, applied to matrices only (not to biases, norms or other vectors)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW's moment coefficients."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: cosine decay to ``min_lr_ratio``·lr over the remaining steps; ``wsd``
    (warmup-stable-decay, Hägele et al. 2024) holds ``lr`` and decays linearly over the last
    ``decay_fraction`` of the steps; ``constant`` holds ``lr``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and wsd)."""
    decay_fraction: float = 0.2
    """wsd only: the fraction of all steps spent in the final decay."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ScratchLMError(f"model.optim.lr={self.lr}: must be positive")
        if self.warmup_steps < 0:
            raise ScratchLMError(f"model.optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ScratchLMError(f"model.optim.min_lr_ratio={self.min_lr_ratio}: must lie in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ScratchLMError(f"model.optim.decay_fraction={self.decay_fraction}: must lie in (0, 1]")


def lr_multiplier(step: int, total_steps: int, config: OptimConfig) -> float:
    """The factor on ``config.lr`` at optimizer step ``step`` of ``total_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr_ratio
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        span = max(1, total_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = total_steps - int(config.decay_fraction * total_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1.0 - (1.0 - floor) * progress


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (embeddings and projections) decay; biases and norm weights do not, since
    shrinking them toward zero only fights the normalisation (as in GPT-2 and nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


FUSED_DEVICES = ("cpu", "cuda")
"""Devices where AdamW takes PyTorch's fused kernel: one pass over each parameter and its moments
instead of a dozen, and a ``found_inf`` flag that skips the update on the device itself."""


def fused_supported(model: nn.Module) -> bool:
    return all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in model.parameters())


def build_optimizer(model: nn.Module, config: OptimConfig, total_steps: int, fused: bool = True):
    """AdamW plus a per-step LambdaLR, in the shape Lightning's ``configure_optimizers`` returns;
    AdamW is fused where the device supports it, unless ``fused`` is False."""
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps,
        fused=fused and fused_supported(model),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, config)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
