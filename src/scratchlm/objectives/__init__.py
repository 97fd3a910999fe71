"""Objectives own the corruption of a batch (run at collate time, in DataLoader workers) and the loss.

Every objective has the same two-part contract:

- ``collate(blocks) -> batch``: turns packed blocks (``input_ids`` and ``doc_ids`` arrays of length
  T, ``doc_ids == -1`` at padding) into tensors: ``input_ids`` (B, T), ``attention_mask`` (B, T)
  bool, ``labels`` (B, T) with -100 where no loss is taken, and ``doc_ids`` (B, T).
  ``eval_collate`` does the same with randomness fixed by the blocks' content, so every validation
  pass scores the same corruption.
- ``loss(model, batch) -> (loss, metrics)``: runs the model and returns the mean loss over the
  positions that count, plus detached metrics to log.
"""

from scratchlm.objectives.batch import IGNORE_INDEX
from scratchlm.objectives.clm import CausalLM
from scratchlm.objectives.infill import InfillConfig, TextInfilling
from scratchlm.objectives.mlm import MaskedLM, MaskingConfig
from scratchlm.objectives.span import SpanConfig, SpanCorruption

OBJECTIVES = {"mlm": MaskedLM, "clm": CausalLM, "infill": TextInfilling, "span": SpanCorruption}

__all__ = ["IGNORE_INDEX", "OBJECTIVES", "CausalLM", "InfillConfig", "MaskedLM", "MaskingConfig", "SpanConfig", "SpanCorruption", "TextInfilling"]

