"""Training: the LightningModule that composes a model and an objective, its optimizer, callbacks,
and the bridge from a trained module or checkpoint to an export."""

from scratchlm.training.checkpoint import TrainedModel
from scratchlm.training.optim import OptimConfig, lr_multiplier

__all__ = ["OptimConfig", "PretrainModule", "TokenThroughput", "TrainedModel", "lr_multiplier"]


def __getattr__(name: str):
    """The Lightning classes are imported on first use: importing Lightning takes seconds, which
    loading a checkpoint to export it need not wait for."""
    if name == "PretrainModule":
        from scratchlm.training.module import PretrainModule

        return PretrainModule
    if name == "TokenThroughput":
        from scratchlm.training.callbacks import TokenThroughput

        return TokenThroughput
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
