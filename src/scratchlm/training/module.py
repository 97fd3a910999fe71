"""The LightningModule: a model and an objective, composed. It has no layers of its own."""

from dataclasses import asdict
from pathlib import Path
import random
import warnings
from typing import Any, Literal

import lightning as L
import numpy as np
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.export import check_exportable
from scratchlm.models import FAMILIES, build_config, build_model
from scratchlm.objectives import OBJECTIVES, InfillConfig, MaskedLM, MaskingConfig, SpanConfig
from scratchlm.tokenizer import TokenizerInfo
from scratchlm.training.callbacks import host_scalar
from scratchlm.training.checkpoint import CHECKPOINT_KEY
from scratchlm.training.guard import NonFiniteGuard
from scratchlm.training.optim import OptimConfig, build_optimizer

SEQ2SEQ_OBJECTIVES = ("span", "infill")
"""Objectives of encoder-decoder families (``Family.encoder_decoder``); the others are theirs alone."""

RNG_KEY = "scratchlm_rng"
"""Where the generators' states live inside a Lightning checkpoint, which keeps none of its own."""


def random_states() -> dict[str, Any]:
    """The global generators a training step draws from (dropout, and any user code), in types
    that Lightning's ``weights_only`` checkpoint loading accepts (tensors, numbers, tuples)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class PretrainModule(L.LightningModule):
    """Pre-trains one model family with one objective."""

    def __init__(
        self,
        tokenizer: str | None = None,
        family: str = "gpt2",
        size: str = "tiny",
        arch: dict[str, Any] | None = None,
        objective: Literal["mlm", "clm", "span", "infill"] | None = None,
        masking: MaskingConfig | None = None,
        span: SpanConfig | None = None,
        infill: InfillConfig | None = None,
        document_masks: bool = False,
        optim: OptimConfig | None = None,
        max_bad_steps: int = 20,
        compile: bool = False,
    ) -> None:
        """
        Args:
            tokenizer: Trained tokenizer folder (from ``scratchlm tokenizer train``); the model's
                vocabulary size and special tokens come from it.
            family: Model family: bert, gpt2, llama, modernbert, modernbert-causal, t5 or bart.
            size: Preset of the family: tiny, small or base.
            arch: Overrides of preset fields, e.g. ``{n_layers: 2, d_model: 64}``.
            objective: mlm or clm (encoders and decoders), span or infill (encoder-decoders);
                the family's default when unset.
            masking: MLM masking: rates, 80/10/10 split, whole words, fixed count (mlm only).
            span: T5 span corruption: noise density and mean span length (span only).
            infill: BART text infilling and sentence permutation (infill only).
            document_masks: Keep attention inside each packed document (block-diagonal, plus
                causal for decoders), with positions restarting per document where the family
                supports it; otherwise packed documents see each other, as in GPT-2 and BERT.
            optim: AdamW and learning-rate schedule.
            max_bad_steps: Steps in a row whose loss or gradient norm is not finite that are
                skipped (and counted in train/skipped_steps) before the run stops with a checkpoint;
                the count is read from the device every min(log_every_n_steps, max_bad_steps)
                steps, so the stop comes within as many steps again.
            compile: Compile the model's forward pass with ``torch.compile`` when training starts;
                where it cannot compile (no C++ compiler, an unsupported op), training goes on
                uncompiled after one warning.
        """
        super().__init__()
        self.save_hyperparameters()
        if max_bad_steps < 0:
            raise ScratchLMError(
                f"model.max_bad_steps={max_bad_steps}: must be >= 0 (0 stops at the first step whose loss or "
                "gradients are not finite)"
            )
        if tokenizer is None:
            raise ScratchLMError("no tokenizer: pass --data.tokenizer DIR (from scratchlm tokenizer train)")
        if family not in FAMILIES:
            raise ScratchLMError(f"model.family={family!r}: unknown; choose one of {sorted(FAMILIES)}")
        self.tokenizer_info = TokenizerInfo.load(tokenizer)
        self.family = family
        config = build_config(family, size, vocab_size=self.tokenizer_info.vocab_size, **(arch or {}))
        check_exportable(family, config)
        self.model = build_model(family, config)
        self.objective = self._build_objective(
            objective or FAMILIES[family].objective, masking, document_masks, {"span": span, "infill": infill}
        )
        self.optim = optim or OptimConfig()
        self.tokens_seen = 0
        self.max_bad_steps = max_bad_steps
        self.guard = NonFiniteGuard()
        self._grad_norm: torch.Tensor | None = None  # this step's, before clipping
        self._finite_loss: torch.Tensor | None = None
        self._checked_at = -1
        self.compile = compile
        self._compile_proven = not compile
        self._fitted_to_data = False
        self._val_sum = self._val_count = None

    def _build_objective(
        self, name: str, masking: MaskingConfig | None, document_masks: bool, seq2seq_configs: dict[str, Any]
    ):
        if name not in OBJECTIVES:
            raise ScratchLMError(f"model.objective={name!r}: unknown; choose one of {sorted(OBJECTIVES)}")
        encoder_decoder = FAMILIES[self.family].encoder_decoder
        if (name in SEQ2SEQ_OBJECTIVES) != encoder_decoder:
            raise ScratchLMError(
                f"model.objective={name} does not fit model.family={self.family}: encoder-decoders (t5, "
                "bart) train with span or infill, encoders and decoders with mlm or clm"
            )
        if encoder_decoder:
            if document_masks:
                raise ScratchLMError(
                    f"model.document_masks is not supported for {self.family}: its objective "
                    "corrupts each packed block as one text, as T5 and BART do; leave it false"
                )
            return OBJECTIVES[name](self.tokenizer_info, seq2seq_configs[name])
        if name == "mlm":
            return MaskedLM(self.tokenizer_info, masking, document_masks)
        if FAMILIES[self.family].causal is False:
            raise ScratchLMError(
                f"model.objective=clm needs a causal family; {self.family!r} is an encoder (use mlm)"
            )
        return OBJECTIVES[name](self.tokenizer_info, document_masks)

    # --- wiring to the data ------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Hand the objective's corruption to the data module, so it runs in the loader workers,
        and check that the data fits the model."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        datamodule.collate_fn = self.objective.collate
        datamodule.eval_collate_fn = self.objective.eval_collate
        datamodule.word_starts = self.objective.needs_word_starts
        max_positions = self.model.config.max_positions
        longest = max(self.sequence_lengths(datamodule.block_size))
        if longest > max_positions:
            raise ScratchLMError(
                f"data.block_size={datamodule.block_size} gives sequences of {longest} tokens, more than "
                f"the model's {max_positions} positions; lower data.block_size or raise model.arch.max_positions"
            )
        data_vocab = datamodule.tokenizer_info.vocab_size
        if data_vocab != self.tokenizer_info.vocab_size:
            raise ScratchLMError(
                f"data.tokenizer ({datamodule.tokenizer_info.path}, {data_vocab} tokens) differs from "
                f"model.tokenizer ({self.tokenizer_info.path}, {self.tokenizer_info.vocab_size} tokens); "
                "use one tokenizer for both"
            )

    def sequence_lengths(self, block_size: int) -> tuple[int, ...]:
        """Lengths of the sequences a block of ``block_size`` tokens becomes: the block itself, or
        an encoder-decoder objective's encoder and decoder lengths (which may also refuse the
        block, e.g. for want of sentinels)."""
        lengths = getattr(self.objective, "sequence_lengths", None)
        return (block_size,) if lengths is None else tuple(lengths(block_size))

    # --- steps -------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.compile:
            # In place: parameter names, checkpoints and exports stay those of the plain model.
            self.model.compile()

    def compiled_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The objective's loss; on the first step of a compiled model, a failure to compile
        (raised at the first call, not by ``compile()``) falls back to the uncompiled model."""
        if self._compile_proven:
            return self.objective.loss(self.model, batch)
        try:
            result = self.objective.loss(self.model, batch)
        except Exception as error:  # noqa: BLE001  (any compiler failure; a real bug raises again below)
            warnings.warn(
                f"torch.compile could not compile the model ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); training continues uncompiled",
                stacklevel=1,
            )
            self.model._compiled_call_impl = None  # what nn.Module.compile() set
            result = self.objective.loss(self.model, batch)
        self._compile_proven = True
        return result

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # A model that fits a part of itself to the data (BART's output bias) does so on the first
        # batch of a run from scratch; a resumed run finds it in its checkpoint.
        fit = getattr(self.model, "fit_logit_bias", None)
        if fit is not None and self.global_step == 0 and not self._fitted_to_data:
            fit(batch["labels"])
        self._fitted_to_data = True

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compiled_loss(batch)
        # Whether the loss is finite is decided in on_before_optimizer_step, on the device.
        finite = torch.isfinite(loss.detach())
        self._finite_loss = finite if self._finite_loss is None else self._finite_loss & finite
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", host_scalar(self.optimizers().param_groups[0]["lr"]))
        for name, value in metrics.items():
            self.log(f"train/{name}", value)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the update when the loss (of any micro-batch) or the gradients are not finite.
        Fused AdamW skips it on the device (``found_inf``), so the step never waits for the
        answer; any other optimizer gets its grads cleared, and AdamW then leaves each parameter
        and its moments as they were. The gradients' total norm, computed for that, is logged
        (``train/grad_norm``, before clipping) and reused by the clipping."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite, self._finite_loss = self._finite_loss, None
        if finite is None:
            finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if self._grad_norm is not None:  # not finite when any gradient holds a NaN or an inf
            finite = finite & torch.isfinite(self._grad_norm)
            if not (self.scaled_gradients() and optimizer.defaults.get("fused")):  # those are still scaled
                self.log("train/grad_norm", self._grad_norm)
        # Every rank takes the same decision (a loss can be bad on one rank alone): a collective,
        # not a host read; the identity on one device.
        bad = self.trainer.strategy.reduce((~finite).float(), reduce_op="max") > 0
        self.guard.update(bad)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = bad.float()
        elif bad.item():  # one host-device synchronisation per step, off the fused path only
            for parameter in self.model.parameters():
                parameter.grad = None

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far for a loss or gradient that was not finite (reads the
        device)."""
        return self.guard.read()[0]

    def check_nonfinite(self) -> int:
        """Read the guard's counters (one synchronisation) and stop the run with a checkpoint once
        more than ``max_bad_steps`` steps in a row were bad; returns the steps skipped so far."""
        skipped, longest = self.guard.read()
        if longest > self.max_bad_steps:
            path = Path(self.trainer.default_root_dir) / "checkpoints" / f"nonfinite-step{self.global_step}.ckpt"
            self.trainer.save_checkpoint(path)
            raise ScratchLMError(
                f"the loss or its gradients were not finite for {longest} steps in a row (seen at "
                f"step {self.global_step}); stopped with a checkpoint at {path}. Lower "
                "--model.optim.lr, set --trainer.gradient_clip_val 1.0, or train in bf16-mixed rather than fp16"
            )
        return skipped

    def on_train_batch_end(self, outputs, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # A Python int, counted from shapes: no device synchronisation.
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        # The guard is read every few steps: often enough that a run of more than max_bad_steps
        # bad steps stops within as many again, and never more often than metrics are logged.
        every = max(1, min(self.trainer.log_every_n_steps, self.max_bad_steps))
        if self.global_step % every == 0 and self.global_step != self._checked_at:
            self._checked_at = self.global_step
            self.log("train/skipped_steps", host_scalar(self.check_nonfinite()))

    def on_train_end(self) -> None:
        self.check_nonfinite()

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device)
        self._val_count = torch.zeros((), device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, _ = self.compiled_loss(batch)
        targets = (batch["labels"] != -100).sum()
        self._val_sum += loss.detach() * targets
        self._val_count += targets

    def on_validation_epoch_end(self) -> None:
        """Held-out loss weighted by target tokens (not by batches), and its perplexity."""
        total = self.trainer.strategy.reduce(torch.stack([self._val_sum, self._val_count]), reduce_op="sum")
        val_loss = total[0] / total[1].clamp(min=1)
        # Every rank now holds the same value; sync_dist averages identical numbers (and keeps
        # Lightning from warning that epoch-level values are unsynchronised).
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(val_loss), sync_dist=True)

    def configure_optimizers(self):
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 1:
            setting = "trainer.max_steps is not set" if total_steps in (None, -1) else f"trainer.max_steps={total_steps}"
            raise ScratchLMError(
                f"{setting}: the training stream repeats the corpus, so the run length is counted in "
                "steps; pass --trainer.max_steps N (N >= 1)"
            )
        # Under fp16's loss scaling, clipping needs the gradients unscaled first, which Lightning
        # does for an unfused optimizer only (a fused step unscales inside itself, after the clip).
        clipping_scaled = self.scaled_gradients() and bool(self.trainer.gradient_clip_val)
        return build_optimizer(self.model, self.optim, total_steps, fused=not clipping_scaled)

    def scaled_gradients(self) -> bool:
        """Whether gradients reach the optimizer multiplied by a loss scale (fp16 mixed precision's
        ``GradScaler``; bf16 has none)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``--trainer.gradient_clip_val``, clipped here. Lightning's mixed-precision plugin refuses
        any fused optimizer, for fear of fp16's scaled gradients; in bf16 (and fp32) nothing is
        scaled, so the fused AdamW's gradients are clipped directly. Under fp16 the optimizer is
        unfused (``configure_optimizers``) and Lightning clips after unscaling."""
        if not gradient_clip_val:
            return
        if self.scaled_gradients():
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        elif self._grad_norm is not None:
            # The norm of the same gradients, from on_before_optimizer_step: one pass over them saved.
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # --- checkpoints -------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.record()
        checkpoint[RNG_KEY] = random_states()

    def record(self) -> dict[str, Any]:
        """Everything beyond the weights that the exporter needs: with it, a checkpoint is
        self-contained, and needs neither the tokenizer folder nor the recipe to be exported."""
        datamodule = self.trainer.datamodule if self._trainer else None
        return {
            "family": self.family,
            "config": asdict(self.model.config),
            "objective": self.objective.name,
            "tokenizer_files": self.tokenizer_info.files(),
            "special_ids": self.special_ids(),
            "tokens_seen": self.tokens_seen,
            "steps": self.global_step,
            "corpus": datamodule.describe() if hasattr(datamodule, "describe") else None,
            "metrics": self.latest_metrics(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(CHECKPOINT_KEY)
        path = (self.trainer.ckpt_path if self._trainer else None) or "the checkpoint"
        if record is None:
            raise ScratchLMError(f"{path} holds no scratchlm record; resume from a checkpoint written by scratchlm fit")
        if record["family"] != self.family:
            raise ScratchLMError(
                f"{path} holds a {record['family']!r} model but model.family={self.family!r}; "
                "resume with the recipe that wrote it"
            )
        if record["config"] != asdict(self.model.config):
            raise ScratchLMError(
                f"{path} holds a {self.family} model of another shape than this run's; resume with "
                "the recipe and --model flags that wrote it"
            )
        self.tokens_seen = record["tokens_seen"]
        if RNG_KEY in checkpoint:
            restore_random_states(checkpoint[RNG_KEY])

    def special_ids(self) -> dict[str, int | None]:
        info = self.tokenizer_info
        return {
            "pad": info.pad_id, "eos": info.eos_id, "bos": info.bos_id, "mask": info.mask_id,
            "cls": info.cls_id, "sep": info.sep_id, "unk": info.unk_id,
        }

    def latest_metrics(self) -> dict[str, float]:
        """The last logged losses, as plain floats, for the model card."""
        if not self._trainer:
            return {}
        metrics = self.trainer.callback_metrics
        return {k: float(v) for k, v in metrics.items() if k in ("train/loss", "val/loss", "val/ppl")}
