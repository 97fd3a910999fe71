"""The streaming dataset: documents -> this shard's share -> token ids (in the worker) -> packed blocks.

Every (rank, DataLoader worker) pair is one *shard*. All shards read the same document stream;
shard ``s`` of ``S`` keeps the documents of its split whose index in that split is ``s`` modulo
``S``, so each document is tokenized by exactly one shard, none is skipped, and the assignment is
the same on every run and machine. Tokenization runs inside ``__iter__``, so in the DataLoader
workers, in batches; the documents of a prepared corpus (``data.prepared``) come tokenized already.
"""

from collections.abc import Iterable, Iterator, Sequence
import hashlib
import itertools
import os
from typing import Literal

import numpy as np
from tokenizers import Tokenizer
from torch.utils.data import IterableDataset, get_worker_info

from scratchlm.data.packing import Block, Packer
from scratchlm.data.sources import Document, Errors, Source, iter_documents
from scratchlm.tokenizer import TokenizerInfo

Split = Literal["train", "val", "all"]


def validation_score(text: str) -> float:
    """A number in [0, 1) fixed by the text alone: documents scoring below ``val_fraction`` are
    held out. A content hash (not Python's salted ``hash``) keeps the split identical across
    runs, processes and machines, and independent of file order."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_split(document: Document, split: Split, val_fraction: float) -> bool:
    if split == "all":
        return True
    score = validation_score(document.text) if document.score is None else document.score
    return (score < val_fraction) == (split == "val")


def split_documents(
    sources: Sequence[Source], split: Split, val_fraction: float, *, text_field: str, errors: Errors,
    token_ids: bool = False,
) -> Iterator[Document]:
    """The documents of one split, in corpus order (``token_ids``: as ``iter_documents``)."""
    for document in iter_documents(sources, text_field=text_field, errors=errors, token_ids=token_ids):
        if in_split(document, split, val_fraction):
            yield document


def current_shard(rank: int, world_size: int) -> tuple[int, int]:
    """(this shard's index, number of shards) for the calling process and DataLoader worker."""
    worker = get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
    return rank * workers + worker_id, world_size * workers


def tokenize(
    texts: Iterable[str], tokenizer: Tokenizer, separator: int | None, batch_size: int,
    word_starts: bool = False,
) -> Iterator[tuple[list[int], np.ndarray | None]]:
    """Token ids of each text (special tokens added, e.g. [CLS] ... [SEP]), each ending with
    ``separator`` (appended when the tokenizer did not put it there: gpt style's end-of-text), and,
    with ``word_starts``, which tokens begin a word (else None).

    Words are the tokenizer's own pre-tokenization units (its ``word_ids``), so the boundaries are
    right for byte-level BPE, WordPiece and Unigram alike, not only for ``##`` continuation pieces.
    """
    texts = iter(texts)
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which packing never uses:
    # about 30% faster on the built-in corpus. It records no word ids, so word starts need the full call.
    encode_batch = tokenizer.encode_batch if word_starts else getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    while batch := list(itertools.islice(texts, batch_size)):
        for encoding in encode_batch(batch, add_special_tokens=True):
            ids = encoding.ids
            starts = starts_of_words(encoding.word_ids) if word_starts else None
            if separator is not None and (not ids or ids[-1] != separator):
                ids.append(separator)
                if starts is not None:
                    starts = np.append(starts, True)
            yield ids, starts


def token_ids(
    documents: Iterable[Document], tokenizer: Tokenizer, separator: int | None, batch_size: int,
    word_starts: bool = False,
) -> Iterator[tuple[np.ndarray | list[int], np.ndarray | None]]:
    """What :func:`tokenize` yields, for each document in order: a prepared document's stored ids
    and word starts, the others' text tokenized in batches."""
    texts: list[str] = []
    for document in documents:
        if document.ids is None:
            texts.append(document.text)
            if len(texts) == batch_size:
                yield from tokenize(texts, tokenizer, separator, batch_size, word_starts)
                texts = []
            continue
        yield from tokenize(texts, tokenizer, separator, batch_size, word_starts)
        texts = []
        yield document.ids, document.word_starts if word_starts else None
    yield from tokenize(texts, tokenizer, separator, batch_size, word_starts)


def document_separator(info: TokenizerInfo) -> int | None:
    """The token that closes every packed document: end-of-text, else [SEP]."""
    return info.eos_id if info.eos_id is not None else info.sep_id


def starts_of_words(word_ids: list[int | None]) -> np.ndarray:
    """True where a token begins a word: its word id differs from the previous token's. Special
    tokens (word id None) are words of their own."""
    words = np.array([-1 if w is None else w for w in word_ids], dtype=np.int64)
    starts = np.ones(len(words), dtype=np.bool_)
    starts[1:] = (words[1:] != words[:-1]) | (words[1:] == -1)
    return starts


def shuffle_blocks(blocks: Iterable[Block], buffer_size: int, rng: np.random.Generator) -> Iterator[Block]:
    """Approximate shuffle in bounded memory: hold ``buffer_size`` blocks, emit a random one as
    each new block arrives, and the rest in random order at the end."""
    buffer: list[Block] = []
    for block in blocks:
        if len(buffer) < buffer_size:
            buffer.append(block)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = block
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


class PackedBlocks(IterableDataset):
    """Packed token blocks of one split of a corpus, for one rank of a (possibly) distributed run.

    Yields ``{"input_ids": int64 (T,), "doc_ids": int32 (T,)}`` (see ``data.packing``). With
    ``epochs=None`` the stream never ends: the partial block at the end of an epoch is completed by
    the next epoch's documents. With a finite ``epochs`` the last partial block is padded.
    Note that ranks may then yield different numbers of blocks, which a DDP training loop does not
    tolerate: train with ``epochs=None`` and a step budget.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        tokenizer_path: str,
        block_size: int,
        *,
        text_field: str = "text",
        errors: Errors = "strict",
        split: Split = "train",
        val_fraction: float = 0.05,
        seed: int = 0,
        epochs: int | None = 1,
        shuffle_buffer: int = 64,
        rank: int = 0,
        world_size: int = 1,
        tokenize_batch: int = 64,
        word_starts: bool = False,
        skip_batches: int = 0,
        batch_size: int = 1,
    ) -> None:
        """
        Args:
            sources: Where the documents come from (``data.sources.resolve_sources``).
            tokenizer_path: Tokenizer folder; loaded here, so a bad one fails before any worker starts.
            block_size: Tokens per block (T).
            text_field: Field of JSONL / parquet / datasets records that holds the text.
            errors: strict (stop) or replace (U+FFFD) for bytes that are not UTF-8.
            split: train or val (by document hash, see ``validation_score``), or all documents.
            val_fraction: Share of documents held out for validation, in [0, 1).
            seed: Seeds the block shuffle and the per-epoch order of the files.
            epochs: Passes over the corpus; None repeats forever.
            shuffle_buffer: Blocks held for shuffling; 0 or 1 keeps corpus order. The val split
                is never shuffled.
            rank: This process's global rank.
            world_size: Number of processes reading the corpus together.
            tokenize_batch: Documents per ``encode_batch`` call.
            word_starts: Also yield ``word_starts`` (bool, T) per block: which tokens begin a word.
            skip_batches: Batches of ``batch_size`` blocks the loader reading this stream already
                delivered (across its workers) before a resume; they are regenerated and dropped,
                so the stream continues exactly where it stopped.
            batch_size: The loader's batch size (only used with ``skip_batches``).
        """
        super().__init__()
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be None or at least 1, got {epochs}")
        self.sources = list(sources)
        self.tokenizer_info = TokenizerInfo.load(tokenizer_path)
        self.block_size = block_size
        self.text_field = text_field
        self.errors = errors
        self.split = split
        self.val_fraction = val_fraction
        self.seed = seed
        self.epochs = epochs
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.tokenize_batch = tokenize_batch
        self.word_starts = word_starts
        self.skip_batches = skip_batches
        self.batch_size = batch_size

    @property
    def shuffles(self) -> bool:
        return self.shuffle_buffer > 1 and self.split != "val"

    def __iter__(self) -> Iterator[Block]:
        """This shard's blocks, each numbered with a ``sample_seed`` that depends only on (seed,
        shard, position in the shard's stream): randomness drawn from it at collate time (MLM
        masks) is the same whichever process, worker or resumed run collates the block. The first
        ``skip_batches`` batches this shard contributes to its loader are left out (resuming)."""
        shard, num_shards = current_shard(self.rank, self.world_size)
        numbered = (
            {**block, "sample_seed": np.asarray([self.seed, shard, index], dtype=np.int64)}
            for index, block in enumerate(self.blocks(shard, num_shards))
        )
        yield from itertools.islice(numbered, self.skipped_blocks(), None)

    def skipped_blocks(self) -> int:
        """Blocks of this worker's stream that went into the ``skip_batches`` batches already
        trained on. A DataLoader takes batch k from worker k mod W, each of ``batch_size``
        consecutive blocks of that worker's stream."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        batches = len(range(worker_id, self.skip_batches, workers))
        return batches * self.batch_size

    def blocks(self, shard: int, num_shards: int) -> Iterator[Block]:
        if get_worker_info() is not None:
            # One process per worker already; tokenizers' own threads would only oversubscribe the cores.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        info = self.tokenizer_info
        tokenizer = info.tokenizer()
        separator = document_separator(info)
        packer = Packer(self.block_size, first_not_none(info.pad_id, info.eos_id, 0), self.word_starts)
        for epoch in itertools.count() if self.epochs is None else range(self.epochs):
            documents = CountingIterator(self.shard_documents(epoch, shard, num_shards))
            encoded = token_ids(documents, tokenizer, separator, self.tokenize_batch, self.word_starts)
            blocks = (block for ids, starts in encoded for block in packer.add(ids, starts))
            if self.shuffles:
                blocks = shuffle_blocks(blocks, self.shuffle_buffer, self.rng(epoch, shard))
            yield from blocks
            if documents.count == 0:
                return  # this shard has no documents: repeating nothing forever would hang the loader
        last = packer.flush()
        if last is not None:
            yield last

    def shard_documents(self, epoch: int, shard: int, num_shards: int) -> Iterator[Document]:
        """This shard's documents of the split, for one epoch."""
        documents = split_documents(
            self.epoch_sources(epoch), self.split, self.val_fraction,
            text_field=self.text_field, errors=self.errors, token_ids=True,
        )
        for index, document in enumerate(documents):
            if index % num_shards == shard:
                yield document

    def epoch_sources(self, epoch: int) -> list[Source]:
        """The files in a fresh order each training epoch; the order depends on (seed, epoch) only,
        so every shard agrees on it and the round-robin assignment stays a partition."""
        if not self.shuffles or len(self.sources) < 2:
            return self.sources
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sources))
        return [self.sources[i] for i in order]

    def rng(self, epoch: int, shard: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, shard])


class CountingIterator:
    """Passes items through and counts them."""

    def __init__(self, items: Iterable) -> None:
        self._items = iter(items)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.count += 1
        return item


def first_not_none(*values: int | None) -> int:
    return next(v for v in values if v is not None)
