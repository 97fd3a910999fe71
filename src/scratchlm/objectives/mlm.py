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
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.data import collate_blocks
from scratchlm.models.layers import gather_positions
from scratchlm.objectives.batch import IGNORE_INDEX, content_generator, model_mask, sample_generator
from scratchlm.objectives.cross_entropy import vocab_cross_entropy


@dataclass
class MaskingConfig:
    """How MLM chooses and corrupts positions."""

    mask_rate: float = 0.15
    """Fraction of real (non-special, non-padding) tokens chosen for prediction."""
    replace_mask: float = 0.8
    """Of the chosen tokens, the fraction replaced by the mask token."""
    replace_random: float = 0.1
    """Of the chosen tokens, the fraction replaced by a random ordinary token; the rest are kept."""
    whole_word: bool = False
    """Choose whole words: all pieces of a word are chosen together (Cui et al. 2019). Words are
    the tokenizer's pre-tokenization units, so this works for BPE, WordPiece and Unigram alike."""
    fixed_count: bool = False
    """Choose exactly round(mask_rate · T) tokens per sequence (at most that many with
    ``whole_word``, never splitting a word), so the prediction head sees a static shape: no
    data-dependent sizes, no host-device synchronisation, fit for ``torch.compile``."""

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

    def __init__(self, tokenizer_info, masking: MaskingConfig | None = None, document_masks: bool = False) -> None:
        if tokenizer_info.mask_id is None:
            raise ScratchLMError(
                f"tokenizer {tokenizer_info.path} has no mask token, which MLM needs; "
                "train one for an encoder family (scratchlm tokenizer train --family bert ...)"
            )
        self.masking = masking or MaskingConfig()
        self.document_masks = document_masks
        self.needs_word_starts = self.masking.whole_word
        """Blocks must carry ``word_starts`` (see ``data.packing``)."""
        self.mask_id = tokenizer_info.mask_id
        special = torch.tensor(sorted(tokenizer_info.special_ids), dtype=torch.long)
        ordinary = torch.ones(tokenizer_info.vocab_size, dtype=torch.bool)
        ordinary[special] = False
        self.special_ids = special
        self.ordinary_ids = ordinary.nonzero().squeeze(1)
        """Token ids a random replacement may draw: never a special token."""

    def collate(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return self.corrupt(collate_blocks(blocks), generator=sample_generator(blocks))

    def eval_collate(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = collate_blocks(blocks)
        return self.corrupt(batch, generator=content_generator(batch["input_ids"]))

    def corrupt(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Choose positions, write their originals into ``labels`` and corrupt ``input_ids``."""
        input_ids = batch["input_ids"].clone()
        chosen = self.choose(batch, generator)
        labels = torch.where(chosen, input_ids, IGNORE_INDEX)
        action = torch.rand(input_ids.shape, generator=generator)
        to_mask = chosen & (action < self.masking.replace_mask)
        to_random = chosen & ~to_mask & (action < self.masking.replace_mask + self.masking.replace_random)
        input_ids[to_mask] = self.mask_id
        draws = torch.randint(len(self.ordinary_ids), (int(to_random.sum()),), generator=generator)
        input_ids[to_random] = self.ordinary_ids[draws]
        masked_positions, masked_rows = self.where_to_predict(labels)
        batch.update(input_ids=input_ids, labels=labels, masked_positions=masked_positions, masked_rows=masked_rows)
        return batch

    def where_to_predict(self, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (B, K), rows (N,)): each row's chosen positions first, in as many columns as
        the fullest row needs (k under ``fixed_count``); and which of the B·K (row, column) pairs
        hold a chosen position. Computed at collate time, on the CPU, so that the training step
        needs no host-device synchronisation to find the masked tokens."""
        chosen_BT = labels_BT != IGNORE_INDEX
        width = self.count(labels_BT.shape[1]) if self.masking.fixed_count else int(chosen_BT.sum(1).max().clamp(min=1))
        positions_BK = chosen_BT.to(torch.int8).topk(width, dim=1).indices
        rows_N = (labels_BT.gather(1, positions_BK) != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        return positions_BK, rows_N

    def choose(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """(B, T) bool: the positions to predict. Special tokens and padding are never chosen; at
        least one position per batch is, so the loss is always defined.

        Every token draws a score in [0, 1); with ``whole_word`` each token takes its word's score
        instead, so a word's pieces are chosen or left together. Tokens under ``mask_rate`` are
        chosen, or, with ``fixed_count``, the k lowest per sequence."""
        input_ids = batch["input_ids"]
        eligible = batch["attention_mask"] & ~torch.isin(input_ids, self.special_ids)
        scores_BT = torch.rand(input_ids.shape, generator=generator)
        if self.masking.whole_word:
            word_BT = batch["word_starts"].long().cumsum(1) - 1  # index of each token's word in its row
            scores_BT = scores_BT.gather(1, word_BT)
        scores_BT = scores_BT.masked_fill(~eligible, 2.0)  # above every draw: never chosen
        if self.masking.fixed_count:
            k = self.count(input_ids.shape[1])
            kth_B1 = scores_BT.topk(k, dim=1, largest=False).values[:, -1:]
            # Strictly below the k-th score drops a word that would straddle the k-th token.
            chosen = eligible & ((scores_BT < kth_B1) if self.masking.whole_word else (scores_BT <= kth_B1))
        else:
            chosen = eligible & (scores_BT < self.masking.mask_rate)
        if not chosen.any() and eligible.any():
            chosen = eligible & (scores_BT == scores_BT.min())  # the lowest-scoring token (or word)
        return chosen

    def count(self, length: int) -> int:
        """Positions chosen per sequence of ``length`` tokens under ``fixed_count``."""
        return max(1, round(self.masking.mask_rate * length))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        doc_ids = batch["doc_ids"] if self.document_masks else None
        labels_BT = batch["labels"]
        if "masked_positions" in batch:
            index_BK, rows_N = batch["masked_positions"], batch["masked_rows"]
        else:  # a batch built elsewhere
            index_BK, rows_N = self.where_to_predict(labels_BT)
        if getattr(model, "takes_positions", False):
            # The last block runs only where the loss looks.
            hidden_BKD = model(batch["input_ids"], model_mask(batch), doc_ids=doc_ids, positions=index_BK)
        else:
            hidden_BKD = gather_positions(model(batch["input_ids"], model_mask(batch), doc_ids=doc_ids), index_BK)
        # The filler columns of rows with fewer chosen positions go.
        hidden_ND = hidden_BKD.flatten(0, 1).index_select(0, rows_N)
        targets_N = labels_BT.gather(1, index_BK).flatten().index_select(0, rows_N)
        # The head runs on chosen positions only, fused with the loss.
        loss, accuracy = vocab_cross_entropy(model, hidden_ND, targets_N)
        return loss, {"accuracy": accuracy}
