"""Pieces every objective's collate shares."""

import zlib

import torch

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips."""


def content_generator(input_ids: torch.Tensor) -> torch.Generator:
    """A generator seeded by the batch's tokens: the same blocks always draw the same randomness.

    Validation uses it so that every evaluation scores the same masks, and curves compare."""
    seed = zlib.crc32(input_ids.numpy().tobytes())
    return torch.Generator().manual_seed(seed)
