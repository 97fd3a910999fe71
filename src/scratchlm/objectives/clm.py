"""Causal language modelling: predict token t+1 from tokens up to t."""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from scratchlm.data import collate_blocks
from scratchlm.objectives.batch import IGNORE_INDEX, model_mask
from scratchlm.objectives.cross_entropy import vocab_cross_entropy


class CausalLM:
    """Next-token loss over packed blocks.

    The end-of-text token that closes each document is a target like any other (a model must
    learn when to stop); padding never is. With ``document_masks``, attention stays inside each
    packed document, and the first token of a document is no target of the previous one. Labels are the inputs shifted left by one, so the last
    position of a block has no target: its successor starts the next block.
    """

    name = "clm"

    def __init__(self, tokenizer_info, document_masks: bool = False) -> None:
        self.pad_id = tokenizer_info.pad_id
        self.document_masks = document_masks
        self.needs_word_starts = False

    def collate(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = collate_blocks(blocks)
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        labels[:, :-1] = batch["input_ids"][:, 1:]
        unscored = ~batch["attention_mask"][:, 1:]
        if self.document_masks:
            # A document's last token cannot see the next document, so cannot be asked to predict it.
            unscored |= batch["doc_ids"][:, 1:] != batch["doc_ids"][:, :-1]
        labels[:, :-1][unscored] = IGNORE_INDEX
        batch["labels"] = labels
        return batch

    eval_collate = collate  # nothing random to fix

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        doc_ids = batch["doc_ids"] if self.document_masks else None
        hidden_BTD = model(batch["input_ids"], model_mask(batch), doc_ids=doc_ids)
        # The head fused with the loss: no (B·T, V) logits are ever materialised.
        loss, accuracy = vocab_cross_entropy(model, hidden_BTD.flatten(0, 1), batch["labels"].flatten())
        return loss, {"accuracy": accuracy}
