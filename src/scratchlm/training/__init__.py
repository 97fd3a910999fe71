"""Training: the LightningModule that composes a model and an objective, its optimizer, callbacks,
and the bridge from a trained module or checkpoint to an export."""

from scratchlm.training.callbacks import TokenThroughput
from scratchlm.training.checkpoint import TrainedModel
from scratchlm.training.module import PretrainModule
from scratchlm.training.optim import OptimConfig, lr_multiplier

__all__ = ["OptimConfig", "PretrainModule", "TokenThroughput", "TrainedModel", "lr_multiplier"]
