"""Masked language modelling (BERT, Devlin et al. 2019, §3.1).

A fraction of the real tokens is chosen; of those, ``replace_mask`` become the mask token,
``replace_random`` a random ordinary token, and the rest stay as they are. The loss is taken on the
chosen positions only, and the prediction head runs on those positions alone: at 15% masking that
spares 85% of the (positions × vocabulary) head matmul and its fp32 logits.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.data import collate_blocks
from scratchlm.objectives.batch import IGNORE_INDEX, content_generator


@dataclass
class MaskingConfig:
    """How MLM chooses and corrupts positions."""

    mask_rate: float = 0.15
    """Fraction of real (non-special, non-padding) tokens chosen for prediction."""
    replace_mask: float = 0.8
    """Of the chosen tokens, the fraction replaced by the mask token."""
    replace_random: float = 0.1
    """Of the chosen tokens, the fraction replaced by a random ordinary token; the rest are kept."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_rate < 1.0:
            raise ScratchLMError(f"model.masking.mask_rate={self.mask_rate}: must lie strictly between 0 and 1")
        for name in ("replace_mask", "replace_random"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ScratchLMError(f"model.masking.{name}={getattr(self, name)}: must lie in [0, 1]")
        if self.replace_mask + self.replace_random > 1.0:
            raise ScratchLMError(
                "model.masking: replace_mask + replace_random must not exceed 1 "
                f"(got {self.replace_mask} + {self.replace_random})"
            )


class MaskedLM:
    """MLM corruption at collate time and a loss on the masked positions only."""

    name = "mlm"

    def __init__(self, tokenizer_info, masking: MaskingConfig | None = None) -> None:
        if tokenizer_info.mask_id is None:
            raise ScratchLMError(
                f"tokenizer {tokenizer_info.path} has no mask token, which MLM needs; "
                "train one for an encoder family (scratchlm tokenizer train --family bert ...)"
            )
        self.masking = masking or MaskingConfig()
        self.mask_id = tokenizer_info.mask_id
        special = torch.tensor(sorted(tokenizer_info.special_ids), dtype=torch.long)
        ordinary = torch.ones(tokenizer_info.vocab_size, dtype=torch.bool)
        ordinary[special] = False
        self.special_ids = special
        self.ordinary_ids = ordinary.nonzero().squeeze(1)
        """Token ids a random replacement may draw: never a special token."""

    def collate(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return self.corrupt(collate_blocks(blocks), generator=None)

    def eval_collate(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = collate_blocks(blocks)
        return self.corrupt(batch, generator=content_generator(batch["input_ids"]))

    def corrupt(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Choose positions, write their originals into ``labels`` and corrupt ``input_ids``.

        Special tokens and padding are never chosen. At least one position per batch is, so the
        loss is always defined."""
        input_ids = batch["input_ids"].clone()
        eligible = batch["attention_mask"] & ~torch.isin(input_ids, self.special_ids)
        chosen = eligible & (torch.rand(input_ids.shape, generator=generator) < self.masking.mask_rate)
        if not chosen.any() and eligible.any():
            first = eligible.flatten().nonzero()[0]
            chosen.view(-1)[first] = True

        labels = torch.where(chosen, input_ids, IGNORE_INDEX)
        action = torch.rand(input_ids.shape, generator=generator)
        to_mask = chosen & (action < self.masking.replace_mask)
        to_random = chosen & ~to_mask & (action < self.masking.replace_mask + self.masking.replace_random)
        input_ids[to_mask] = self.mask_id
        draws = torch.randint(len(self.ordinary_ids), (int(to_random.sum()),), generator=generator)
        input_ids[to_random] = self.ordinary_ids[draws]

        batch.update(input_ids=input_ids, labels=labels)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        hidden_BTD = model(batch["input_ids"], batch["attention_mask"])
        chosen = batch["labels"] != IGNORE_INDEX
        logits_NV = model.logits(hidden_BTD[chosen])  # the head runs on chosen positions only
        targets_N = batch["labels"][chosen]
        loss = F.cross_entropy(logits_NV.float(), targets_N)
        accuracy = (logits_NV.argmax(-1) == targets_N).float().mean()
        return loss, {"accuracy": accuracy.detach()}
