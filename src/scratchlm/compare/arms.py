"""Building the arms and training each to the same budget on the same token stream.

Every arm of a comparison gets the same tokenizer, the same data module settings (files, held-out
split, block size, batch size, shuffle seed: hence the same blocks in the same order), the same
width and depth, the same optimizer and schedule, and the same seed for its weights (two arms
with the same parameter shapes, such as ``modernbert`` and ``modernbert-causal``, start from
identical weights). They differ only in what the family and objective make different.

Tokens are counted as blocks of the shared stream: ``data.batch_size`` blocks of
``data.block_size`` tokens per step, for every arm. A span arm reads the same blocks and makes
each into a shorter encoder input and a target (``objectives.span``); its tokens are the block
tokens those came from, and its FLOPs are counted per block token too.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
import logging
import math
import time
import warnings

import lightning as L

from scratchlm.compare.config import Arm, Budget, CompareConfig
from scratchlm.data import TextDataModule
from scratchlm.errors import ScratchLMError
from scratchlm.training import PretrainModule
from scratchlm.training.flops import EncoderDecoderFlopCount, FlopCount, flop_count, head_parameters  # noqa: F401  (re-exported)

CALIBRATION_STEPS = 6
"""Steps of the timed run that turns a minutes budget into a step count (the first is not timed)."""


# --- building --------------------------------------------------------------------------------------


def build_module(arm: Arm, config: CompareConfig, tokenizer: str, seed: int) -> PretrainModule:
    """The arm's LightningModule, its weights drawn from ``seed``."""
    L.seed_everything(seed, verbose=False)
    model = config.model
    return PretrainModule(
        tokenizer=tokenizer,
        family=arm.family,
        size=model.size,
        arch={**model.arch, **arm.arch},
        objective=arm.objective_name,
        masking=model.masking,
        span=model.span,
        document_masks=model.document_masks,
        optim=model.optim,
    )


def build_datamodule(config: CompareConfig, tokenizer: str, seed: int) -> TextDataModule:
    """The token stream, identical for every arm of one seed."""
    data = config.data
    return TextDataModule(
        paths=data.paths,
        tokenizer=tokenizer,
        val_paths=data.val_paths,
        val_fraction=data.val_fraction,
        text_field=data.text_field,
        block_size=data.block_size,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        seed=seed,
        shuffle_buffer=data.shuffle_buffer,
        errors=data.errors,
    )


@dataclass(frozen=True)
class ArmSize:
    """The size of an arm's model and its training cost per token."""

    params: int
    """Every parameter, tied ones once."""
    params_non_embedding: int
    """Without the embedding tables (Kaplan et al.'s N)."""
    flops: FlopCount | EncoderDecoderFlopCount
    shape: dict[str, int]
    """Layers (``decoder_layers`` too for encoder-decoders), ``d_model`` and ``d_ff``."""


def arm_size(arm: Arm, config: CompareConfig, tokenizer: str) -> ArmSize:
    """Measured on a freshly built model of the arm (this also checks that it can be built, and
    that its objective can make sequences of the block size)."""
    module = build_module(arm, config, tokenizer, seed=0)
    model, block_size = module.model, config.data.block_size
    lengths = module.sequence_lengths(block_size)  # refuses a block the objective cannot corrupt
    if max(lengths) > model.config.max_positions:  # as training would, but before anything trains
        raise ScratchLMError(
            f"arms: {arm.name}: data.block_size={block_size} gives sequences of {max(lengths)} tokens, more "
            f"than its max_positions={model.config.max_positions}; lower data.block_size or add max_positions: "
            f"{max(lengths)} to the arm's arch"
        )
    if arm.objective_name == "span" and block_size + 1 > model.config.max_positions:
        raise ScratchLMError(
            f"arms: {arm.name}: held-out scoring reads windows of data.block_size={block_size} tokens and an "
            f"end-of-text, more than its max_positions={model.config.max_positions}; add max_positions: "
            f"{block_size + 1} to the arm's arch (T5's relative positions need no table) or lower data.block_size"
        )
    encoder_decoder = getattr(model, "is_encoder_decoder", False)
    flops = flop_count(model, arm.objective_name, block_size, config.model.masking.mask_rate,
                       lengths=lengths if encoder_decoder else None)
    return ArmSize(model.num_params(), model.num_params(exclude_embeddings=True), flops, model_shape(model.config))


def model_shape(config) -> dict[str, int]:
    shape = {"layers": config.n_layers, "d_model": config.d_model, "d_ff": config.d_ff}
    if hasattr(config, "n_decoder_layers"):
        shape["decoder_layers"] = config.n_decoder_layers
    return shape


# --- budgets ---------------------------------------------------------------------------------------


def block_tokens_per_step(config: CompareConfig) -> int:
    """Block tokens of the shared stream in one optimizer step, the same for every arm."""
    return config.data.batch_size * config.data.block_size


def steps_for_budget(budget: Budget, flops: FlopCount | EncoderDecoderFlopCount, tokens_per_step: int,
                     step_seconds: float | None) -> int:
    """Optimizer steps that spend ``budget``: whole batches of the shared stream, at least one."""
    if budget.tokens is not None:
        return max(1, math.ceil(budget.tokens / tokens_per_step))
    if budget.flops is not None:
        return max(1, round(budget.flops / (flops.per_token * tokens_per_step)))
    if step_seconds is None:
        raise ValueError("a minutes budget needs the measured seconds per step")
    return max(1, int(budget.minutes * 60 / step_seconds))


# --- training --------------------------------------------------------------------------------------


@dataclass
class CurvePoint:
    step: int
    tokens: int
    flops: float
    val_loss: float


@dataclass
class ArmRun:
    """One arm trained with one seed."""

    module: PretrainModule
    steps: int
    tokens: int
    flops: float
    train_seconds: float
    """Wall time of the training steps, validation passes excluded."""
    curve: list[CurvePoint] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)


class CurveRecorder(L.Callback):
    """Held-out loss after each validation pass, against block tokens and FLOPs trained so far."""

    def __init__(self, flops_per_token: float, tokens_per_step: int) -> None:
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.points: list[CurvePoint] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        # Runs after the module logged val/loss (callbacks' on_validation_epoch_end run before it).
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or trainer.sanity_checking:
            return
        tokens = trainer.global_step * self.tokens_per_step
        if self.points and self.points[-1].tokens == tokens:
            return  # the closing validation at a step that was just evaluated
        self.points.append(CurvePoint(trainer.global_step, tokens, tokens * self.flops_per_token, float(loss)))


class TrainingClock(L.Callback):
    """Wall time of training, validation passes excluded (they are not part of the budget)."""

    def __init__(self) -> None:
        self.started = self.finished = 0.0
        self.validating = 0.0
        self._val_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validating += time.perf_counter() - self._val_start

    def on_train_end(self, trainer, pl_module) -> None:
        self.finished = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.finished - self.started - self.validating


class StepClock(L.Callback):
    """Seconds per training step, the first (warm-up) step left out."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.marks.append(time.perf_counter())

    @property
    def seconds_per_step(self) -> float:
        return (self.marks[-1] - self.marks[0]) / max(1, len(self.marks) - 1)


def trainer_for(config: CompareConfig, steps: int, callbacks: list, *, validate: bool, max_seconds: float | None = None) -> L.Trainer:
    """A single-device Trainer for ``steps`` steps that writes nothing (no logger, no checkpoints)
    and, with ``validate``, evaluates the held-out loss ``train.curve_points`` times."""
    train = config.train
    every = max(1, steps // train.curve_points)
    return L.Trainer(
        max_steps=steps,
        max_time={"seconds": max_seconds} if max_seconds else None,
        accelerator=train.accelerator,
        devices=1,
        precision=train.precision,
        gradient_clip_val=train.gradient_clip_val,
        val_check_interval=every if validate else None,
        check_val_every_n_epoch=None,
        limit_val_batches=train.val_batches if validate else 0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=train.progress_bar,
        callbacks=callbacks,
        default_root_dir=config.out,
    )


def seconds_per_step(arm: Arm, config: CompareConfig, tokenizer: str) -> float:
    """A short timed run of the arm, for a minutes budget."""
    clock = StepClock()
    module = build_module(arm, config, tokenizer, seed=0)
    with quiet_lightning():
        trainer = trainer_for(config, CALIBRATION_STEPS, [clock], validate=False)
        trainer.fit(module, build_datamodule(config, tokenizer, 0))
    return clock.seconds_per_step


def train_arm(arm: Arm, config: CompareConfig, tokenizer: str, seed: int, steps: int,
              flops: FlopCount | EncoderDecoderFlopCount) -> ArmRun:
    """Train one arm for ``steps`` steps of the seed's token stream, recording its held-out curve."""
    module = build_module(arm, config, tokenizer, seed)
    datamodule = build_datamodule(config, tokenizer, seed)
    curve, clock = CurveRecorder(flops.per_token, block_tokens_per_step(config)), TrainingClock()
    # A minutes budget is also a hard stop, with some slack for the step estimate's error.
    cap = config.budget.minutes * 60 * 1.25 if config.budget.minutes else None
    with quiet_lightning():
        trainer = trainer_for(config, steps, [curve, clock], validate=True, max_seconds=cap)
        trainer.fit(module, datamodule)
        tokens = trainer.global_step * block_tokens_per_step(config)
        if datamodule.has_validation and (not curve.points or curve.points[-1].tokens != tokens):
            trainer.validate(module, datamodule, verbose=False)  # the curve ends at the final weights
    if not datamodule.has_validation:
        raise ScratchLMError(
            f"no held-out documents in {datamodule.describe()} (--data.val_fraction={config.data.val_fraction}); "
            "raise --data.val_fraction or pass --data.val_paths: the comparison evaluates on held-out text"
        )
    return ArmRun(module, trainer.global_step, tokens, tokens * flops.per_token, clock.seconds, curve.points)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Training without Lightning's banners (device lines, the small-loader and few-workers
    hints): the comparison prints its own progress."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*`max_epochs` was not set.*")
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")  # Lightning 2.6 on torch 2.13
        try:
            yield
        finally:
            logger.setLevel(level)
