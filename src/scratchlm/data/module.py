"""The LightningDataModule: a corpus and a tokenizer in, DataLoaders of packed blocks out.

Its ``__init__`` signature is the ``--data.*`` part of ``scratchlm fit``. It knows nothing of
objectives: the training module swaps ``collate_fn`` / ``eval_collate_fn`` for its objective's, and
those run in the loader workers.
"""

from collections.abc import Callable, Iterator
import multiprocessing
import os
import sys
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from scratchlm.data.packing import collate_blocks
from scratchlm.data.prepared import check_read_once, check_tokenizer
from scratchlm.data.sources import Document, Source, describe_sources, first_document, resolve_sources
from scratchlm.data.stream import PackedBlocks, split_documents
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import TokenizerInfo

Collate = Callable[[list[dict[str, np.ndarray]]], dict[str, torch.Tensor]]


class TextDataModule(L.LightningDataModule):
    """Streams a corpus as packed token blocks: an endless shuffled training stream and a fixed
    validation pass, split across ranks and DataLoader workers without overlap."""

    def __init__(
        self,
        paths: list[str] | str | None = None,
        tokenizer: str | None = None,
        val_paths: list[str] | str | None = None,
        val_fraction: float = 0.05,
        text_field: str = "text",
        block_size: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 64,
        errors: Literal["strict", "replace"] = "strict",
        train_epochs: int | None = None,
    ) -> None:
        """
        Args:
            paths: Training text, one path or a list ('[a.jsonl, more/, "b/*.txt"]'): .txt (one
                document per paragraph), .jsonl[.gz|.zst] / .json lines, .parquet files, folders,
                globs, datasets save_to_disk folders, datasets:NAME[:SPLIT], or folders written by
                scratchlm prepare (token ids). Unset: the built-in corpus (the Python reference
                docs shipped with CPython).
            tokenizer: Tokenizer folder (from scratchlm tokenizer train); when unset, fit takes
                the tokenizer of a prepared corpus in paths, or trains one into the run folder.
            val_paths: Separate validation text, in the same forms as paths. Unset: hold out
                val_fraction of the training documents instead.
            val_fraction: Share of documents held out for validation when val_paths is unset,
                chosen by a hash of each document's text (the same on every run); 0 for none.
            text_field: Field of JSONL records / parquet and datasets columns that holds the text.
            block_size: Tokens per training sequence; documents are packed end to end into blocks.
            batch_size: Blocks per batch on each device.
            num_workers: DataLoader worker processes per device (tokenization runs in them).
            seed: Seeds the order of files and the shuffle of blocks.
            shuffle_buffer: Blocks held in memory by each worker to shuffle the training stream;
                0 keeps corpus order.
            errors: Bytes that are not UTF-8: strict stops with the file and line, replace reads
                them as U+FFFD.
            train_epochs: Passes over the training documents; unset repeats forever (the run's
                length is trainer.max_steps). A finite count is for inspecting the stream: ranks
                may then get different numbers of batches, which DDP training does not tolerate.
        """
        super().__init__()
        check_settings(val_fraction, block_size, batch_size, num_workers, seed, shuffle_buffer, errors, train_epochs)
        self.save_hyperparameters()
        self.paths = [paths] if isinstance(paths, str) else paths
        self.tokenizer = tokenizer
        self.val_paths = [val_paths] if isinstance(val_paths, str) else val_paths
        self.val_fraction = val_fraction
        self.text_field = text_field
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.errors = errors
        self.train_epochs = train_epochs
        self.collate_fn: Collate = collate_blocks
        """Turns a list of blocks into a training batch; the training module sets its objective's."""
        self.eval_collate_fn: Collate = collate_blocks
        """The same for validation batches."""
        self.word_starts = False
        self.resume_batches = 0
        """Training batches already delivered by an earlier run (from ``load_state_dict``)."""
        """Pack ``word_starts`` (which tokens begin a word) into the blocks; set by an objective that
        masks whole words."""
        self.tokenizer_info: TokenizerInfo | None = None
        self.sources: list[Source] = []
        self.val_sources: list[Source] = []
        self.has_validation = False

    # --- preflight -----------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Resolve the paths and check, before any worker starts, that there is a tokenizer,
        training text and (or else a warning) validation text."""
        if self.tokenizer_info is not None:
            return
        if self.tokenizer is None:
            raise ScratchLMError(
                "--data.tokenizer is not set: pass --data.tokenizer DIR (from scratchlm tokenizer train)"
            )
        tokenizer_info = TokenizerInfo.load(self.tokenizer)
        self.sources = resolve_sources(self.paths)
        self.val_sources = resolve_sources(self.val_paths, flag="--data.val_paths") if self.val_paths else []
        check_tokenizer(self.sources + self.val_sources, tokenizer_info)
        check_read_once(self.sources)
        check_read_once(self.val_sources)
        options = {"text_field": self.text_field, "errors": self.errors, "token_ids": True}
        first_document(self.sources, **options)
        if self.val_sources:
            first_document(self.val_sources, **options)
        self.check_train_split()
        self.has_validation = bool(self.val_sources) or self.held_out_exists()
        self.tokenizer_info = tokenizer_info
        if not self.has_validation and self.val_fraction > 0:
            rank_zero_warn(
                f"no document of {self.describe()} falls in the validation split "
                f"(--data.val_fraction={self.val_fraction}): validation is skipped; raise "
                "--data.val_fraction or pass --data.val_paths"
            )

    def check_train_split(self) -> None:
        """Every stream (rank x worker) needs a training document of its own, or its loader would
        be empty while the others train."""
        _, world_size = self.rank_and_world()
        streams = world_size * max(1, self.num_workers)
        found = sum(1 for _ in zip(range(streams), self.train_documents()))
        if found == 0:
            raise ScratchLMError(
                f"--data.val_fraction={self.val_fraction} holds out every document of "
                f"{self.describe()}; lower it or pass --data.val_paths"
            )
        if found < streams:
            raise ScratchLMError(
                f"the training text has {found} documents, fewer than the {streams} streams reading "
                f"it ({world_size} processes x {max(1, self.num_workers)} workers); lower "
                "--data.num_workers or add documents"
            )

    def held_out_exists(self) -> bool:
        if self.val_fraction == 0:
            return False
        held_out = split_documents(
            self.sources, "val", self.val_fraction, text_field=self.text_field, errors=self.errors, token_ids=True
        )
        return next(held_out, None) is not None

    def train_documents(self) -> Iterator[Document]:
        split = "all" if self.val_sources else "train"
        return split_documents(
            self.sources, split, self.val_fraction, text_field=self.text_field, errors=self.errors, token_ids=True
        )

    def rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size): from the Trainer when attached, else from an initialised
        ``torch.distributed`` process group, else a single process."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # --- loaders -------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Endless (unless ``train_epochs``), shuffled blocks of this rank's share of the training text."""
        self.setup()
        stream = self.stream(
            self.sources, split="all" if self.val_sources else "train",
            epochs=self.train_epochs, shuffle_buffer=self.shuffle_buffer,
        )
        stream.skip_batches, stream.batch_size = self.resume_batches, self.batch_size
        return self.loader(stream, self.collate_fn, persistent=False)

    def val_dataloader(self) -> DataLoader | list:
        """One pass, in order, over this rank's share of the validation text, the last block padded;
        an empty list (no validation) when the held-out split is empty."""
        self.setup()
        if not self.has_validation:
            return []
        sources, split = (self.val_sources, "all") if self.val_sources else (self.sources, "val")
        stream = self.stream(sources, split=split, epochs=1, shuffle_buffer=0)
        # Persistent workers: validation runs many times, and re-forking each time costs more than the pass.
        return self.loader(stream, self.eval_collate_fn, persistent=self.num_workers > 0)

    def stream(self, sources: list[Source], *, split, epochs: int | None, shuffle_buffer: int) -> PackedBlocks:
        rank, world_size = self.rank_and_world()
        return PackedBlocks(
            sources, self.tokenizer, self.block_size,
            text_field=self.text_field, errors=self.errors, split=split,
            val_fraction=self.val_fraction, seed=self.seed, epochs=epochs,
            shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size,
            word_starts=self.word_starts,
        )

    def loader(self, stream: PackedBlocks, collate: Collate, *, persistent: bool) -> DataLoader:
        if self.num_workers > 0:
            # Set before the workers fork: a tokenizer used here (e.g. trained in this process)
            # would otherwise warn in every worker, and its thread pool may deadlock there.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            # The loader's own generator: its per-iterator seed draw must not advance the global
            # RNG that dropout uses, or a resumed run (which builds its loader at step k, not 0)
            # would drop out different units than the uninterrupted run.
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=persistent,
            multiprocessing_context=worker_start_method() if self.num_workers > 0 else None,
        )

    # --- resuming ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The training stream's position, saved in Lightning checkpoints: the batches the trainer
        has trained on so far, and the settings that decide which blocks those were."""
        trained = 0
        if self.trainer is not None:
            # ``processed`` counts batches whose step ran; a checkpoint taken at the end of a step
            # includes that step's batch (``completed`` is only raised after the callbacks run).
            trained = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        return {"batches": trained, **self.stream_layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the training stream after the saved batches, exactly, or refuse when the
        layout that decides the stream changed (the same batches could not be found again)."""
        saved = {key: state.get(key) for key in self.stream_layout()}
        if saved != self.stream_layout():
            changed = ", ".join(
                f"{key} {saved[key]} -> {value}" for key, value in self.stream_layout().items() if saved[key] != value
            )
            raise ScratchLMError(
                f"cannot resume this run's data stream exactly: {changed}; resume with the original "
                "settings (processes x --data.num_workers, --data.batch_size, --data.seed, --data.block_size)"
            )
        self.resume_batches = int(state["batches"])

    def stream_layout(self) -> dict:
        _, world_size = self.rank_and_world()
        return {
            "world_size": world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
            "seed": self.seed, "block_size": self.block_size, "shuffle_buffer": self.shuffle_buffer,
        }

    def describe(self) -> str:
        """A short description of the training corpus, for the model card."""
        return describe_sources(self.sources or resolve_sources(self.paths))


def worker_start_method() -> str | None:
    """Fork loader workers on Linux, even where the default is another method (a process started
    by ``spawn``, Python 3.14's ``forkserver``): a forked worker starts at once, a spawned one
    re-imports torch and Lightning first (about 13 s per worker measured on two busy cores).
    Workers only read files and tokenize, so fork's hazards (CUDA, threads held by the parent)
    do not reach them; tokenizers' own thread pool is switched off before they fork. Elsewhere
    (macOS, Windows) the platform default stays."""
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return None


def check_settings(
    val_fraction: float, block_size: int, batch_size: int, num_workers: int, seed: int,
    shuffle_buffer: int, errors: str, train_epochs: int | None,
) -> None:
    """Reject impossible ``--data.*`` values up front, naming the flag."""
    checks = [
        ("val_fraction", val_fraction, 0 <= val_fraction < 1, "use a share in [0, 1)"),
        ("block_size", block_size, block_size >= 1, "use 1 or more"),
        ("batch_size", batch_size, batch_size >= 1, "use 1 or more"),
        ("num_workers", num_workers, num_workers >= 0, "use 0 or more"),
        ("seed", seed, seed >= 0, "use 0 or more"),
        ("shuffle_buffer", shuffle_buffer, shuffle_buffer >= 0, "use 0 or more"),
        ("errors", errors, errors in ("strict", "replace"), "use strict or replace"),
        ("train_epochs", train_epochs, train_epochs is None or train_epochs >= 1, "leave it unset or use 1 or more"),
    ]
    for name, value, ok, advice in checks:
        if not ok:
            raise ScratchLMError(f"--data.{name}={value!r} is out of range; {advice}")
