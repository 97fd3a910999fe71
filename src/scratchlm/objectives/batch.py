"""Turning packed blocks into tensors: the part every objective's collate shares."""

from collections.abc import Sequence
import zlib

import numpy as np
import torch

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips."""


def stack_blocks(blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack blocks into ``input_ids`` (B, T) int64, ``doc_ids`` (B, T) int32 and
    ``attention_mask`` (B, T) bool (False at padding, where ``doc_ids == -1``)."""
    input_ids = torch.from_numpy(np.stack([b["input_ids"] for b in blocks])).long()
    doc_ids = torch.from_numpy(np.stack([b["doc_ids"] for b in blocks])).int()
    return {"input_ids": input_ids, "doc_ids": doc_ids, "attention_mask": doc_ids >= 0}


def content_generator(input_ids: torch.Tensor) -> torch.Generator:
    """A generator seeded by the batch's tokens: the same blocks always draw the same randomness.

    Validation uses it so that every evaluation scores the same masks, and curves compare."""
    seed = zlib.crc32(input_ids.numpy().tobytes())
    return torch.Generator().manual_seed(seed)
