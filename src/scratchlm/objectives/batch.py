"""Pieces every objective's collate shares."""

from collections.abc import Sequence
import zlib

import numpy as np
import torch

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips."""


def content_generator(input_ids: torch.Tensor) -> torch.Generator:
    """A generator seeded by the batch's tokens: the same blocks always draw the same randomness.

    Validation uses it so that every evaluation scores the same masks, and curves compare."""
    seed = zlib.crc32(input_ids.numpy().tobytes())
    return torch.Generator().manual_seed(seed)


def sample_generator(blocks: Sequence[dict[str, np.ndarray]]) -> torch.Generator | None:
    """A generator seeded by the blocks' ``sample_seed`` (seed, shard, position in the stream; see
    ``data.stream.PackedBlocks``): a batch's randomness is then fixed by where it sits in the data
    stream, not by which process collates it, so a resumed run corrupts the same batches the same
    way. None (torch's global generator) for blocks that carry no seed."""
    if "sample_seed" not in blocks[0]:
        return None
    seeds = np.stack([block["sample_seed"] for block in blocks])
    return torch.Generator().manual_seed(zlib.crc32(seeds.tobytes()))


def model_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The attention mask to give the model: None when the collate found no padding (``padded``),
    so that SDPA may run its fused kernels; batches built elsewhere keep their mask."""
    return batch["attention_mask"] if batch.get("padded", True) else None
