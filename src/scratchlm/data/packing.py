"""Packing: token-id documents in, fixed-length blocks out, with the document ids riding along.

Documents are laid end to end and cut every ``block_size`` tokens, so no position is wasted on
padding except at the very end of a finite stream. Each block carries ``doc_ids``: which document of
the block each position belongs to (0, 1, ... from the block's start; a document continued from
the previous block is 0), and -1 at padding, so attention can be kept inside a document and
padding out of the loss. Each document is expected to end with its separator token already
(end-of-text or [SEP]); packing adds none. A document longer than a block is split across blocks,
never dropped or truncated. ``collate_blocks`` stacks blocks into a batch of tensors.
"""

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

Block = dict[str, np.ndarray]
"""``{"input_ids": int64 (T,), "doc_ids": int32 (T,)}``, plus ``"word_starts": bool (T,)`` when
word boundaries are packed too."""


class Packer:
    """Fills blocks from documents as they come; the partial block waits for the next document.

    Because the partial block persists across ``add`` calls, an endless training stream simply
    keeps adding documents (the next epoch's first document completes the last epoch's block);
    a finite stream ends with ``flush``.
    """

    def __init__(self, block_size: int, pad_id: int, word_starts: bool = False) -> None:
        """``word_starts``: documents come with a bool array marking the tokens that begin a word,
        and blocks carry it as ``word_starts``. A word cut by a block boundary starts afresh at
        the block's first position, so every block's words lie wholly inside it."""
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.pad_id = pad_id
        self.word_starts = word_starts
        self._new_block()

    def _new_block(self) -> None:
        self._ids = np.empty(self.block_size, dtype=np.int64)
        self._doc_ids = np.empty(self.block_size, dtype=np.int32)
        self._starts = np.empty(self.block_size, dtype=np.bool_) if self.word_starts else None
        self._fill = 0  # positions written in the current block
        self._doc = 0  # doc_id of the next token written

    def add(self, ids: Sequence[int] | np.ndarray, starts: np.ndarray | None = None) -> Iterator[Block]:
        """Append one document (and its word starts, when packed); yield each block it completes
        (none, one, or several)."""
        ids = np.asarray(ids, dtype=np.int64)
        start = 0
        while start < len(ids):
            take = min(self.block_size - self._fill, len(ids) - start)
            self._ids[self._fill : self._fill + take] = ids[start : start + take]
            self._doc_ids[self._fill : self._fill + take] = self._doc
            if self._starts is not None:
                self._starts[self._fill : self._fill + take] = starts[start : start + take]
                self._starts[0] = True
            self._fill += take
            start += take
            if self._fill == self.block_size:
                yield self._take_block()
        if self._fill > 0 and len(ids) > 0:
            self._doc += 1  # the document ended inside this block: the next one gets the next id

    def _take_block(self) -> Block:
        block = {"input_ids": self._ids, "doc_ids": self._doc_ids}
        if self._starts is not None:
            block["word_starts"] = self._starts
        self._new_block()  # hand the arrays out; never write into a block already yielded
        return block

    def flush(self) -> Block | None:
        """The partial block, padded with ``pad_id`` (doc_id -1), or None when there is none."""
        if self._fill == 0:
            return None
        self._ids[self._fill :] = self.pad_id
        self._doc_ids[self._fill :] = -1
        if self._starts is not None:
            self._starts[self._fill :] = True
        return self._take_block()


def pack_documents(
    documents: Iterable[Sequence[int]], block_size: int, pad_id: int, *, pad_last: bool = True
) -> Iterator[Block]:
    """Blocks from a stream of token-id documents; the last partial block is padded when
    ``pad_last``, dropped otherwise."""
    packer = Packer(block_size, pad_id)
    for ids in documents:
        yield from packer.add(ids)
    last = packer.flush()
    if pad_last and last is not None:
        yield last


def collate_blocks(blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack blocks into ``input_ids`` (B, T) int64, ``doc_ids`` (B, T) int32 and
    ``attention_mask`` (B, T) bool, False at padding (``doc_ids == -1``), with ``padded``, a plain
    bool saying whether any position is padding.

    Training blocks are packed full, so ``padded`` is almost always False; models then get no
    mask at all and SDPA runs its fused causal (or unmasked) kernels, where any explicit mask
    would send it to a slower path. Deciding this here, on the CPU side of the loader, costs the
    training step no host-device synchronisation."""
    input_ids = torch.from_numpy(np.stack([b["input_ids"] for b in blocks])).long()
    doc_ids = torch.from_numpy(np.stack([b["doc_ids"] for b in blocks])).int()
    attention_mask = doc_ids >= 0
    batch = {
        "input_ids": input_ids, "doc_ids": doc_ids, "attention_mask": attention_mask,
        "padded": not bool(attention_mask.all()),
    }
    if "word_starts" in blocks[0]:
        batch["word_starts"] = torch.from_numpy(np.stack([b["word_starts"] for b in blocks]))
    return batch
