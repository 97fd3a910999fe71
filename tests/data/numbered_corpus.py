"""A corpus whose documents say who they are: document k opens with ``doc`` and k's three digits
spelled out (``doc zero one seven``), then filler words. Every word is one token of a WordPiece
tokenizer trained on it, so a block of token ids decodes back to the documents in it.

Imported by plain name (``tests/data`` is put on ``sys.path`` by ``conftest.py``), so that the
processes the DDP test spawns can import ``ddp_worker`` too.
"""

import json
from pathlib import Path

import numpy as np

DIGITS = "zero one two three four five six seven eight nine".split()
FILLER = "the cat sat on a mat and then ran far away from home".split()
MARKER_WORDS = 4
"""``doc`` and three digits."""
BLOCK = 16
"""Block size for the ``numbered`` fixture, whose documents are each exactly one block long."""


def document_text(k: int, filler_words: int) -> str:
    marker = ["doc"] + [DIGITS[int(c)] for c in f"{k:03d}"]
    filler = [FILLER[(k + i) % len(FILLER)] for i in range(filler_words)]
    return " ".join(marker + filler)


def write_corpus(path: Path, n_docs: int, filler_words) -> list[str]:
    """Write ``n_docs`` documents as JSONL; ``filler_words(k)`` gives document k's filler length."""
    texts = [document_text(k, filler_words(k)) for k in range(n_docs)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def identities(input_ids: np.ndarray, vocab: dict[int, str]) -> list[int]:
    """The numbers of the documents whose marker appears in a (B, T) or (T,) array of token ids."""
    words = [vocab[int(i)] for i in np.asarray(input_ids).reshape(-1)]
    found = []
    for i, word in enumerate(words[: len(words) - 3]):
        digits = words[i + 1 : i + 4]
        if word == "doc" and all(d in DIGITS for d in digits):
            found.append(int("".join(str(DIGITS.index(d)) for d in digits)))
    return found


def ddp_worker(rank: int, world_size: int, port: int, corpus: str, tokenizer: str, block_size: int, out: str) -> None:
    """One rank of the DDP test: a real process group, a TextDataModule reading its rank from it,
    and one epoch through DataLoader workers; rank 0 writes what every rank saw."""
    import os

    import torch.distributed as dist

    from scratchlm.data import TextDataModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        data = TextDataModule(
            paths=[corpus], tokenizer=tokenizer, val_fraction=0.2, block_size=block_size,
            batch_size=3, num_workers=2, train_epochs=1,
        )
        data.setup("fit")
        vocab = {i: t for t, i in data.tokenizer_info.tokenizer().get_vocab().items()}
        seen = {"train": [], "val": []}
        for split, loader in (("train", data.train_dataloader()), ("val", data.val_dataloader())):
            for batch in loader:
                seen[split] += identities(batch["input_ids"].numpy(), vocab)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, seen)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def ddp_resume_worker(
    rank: int, world_size: int, port: int, corpus: str, tokenizer: str, block_size: int, out: str, stop_after: int
) -> None:
    """One rank of the DDP resume test: train ``stop_after`` batches of one epoch, then, as a
    resumed run would, build a fresh data module, load the position a checkpoint would hold, and
    finish the epoch; rank 0 writes what every rank saw before and after."""
    import os

    import torch.distributed as dist

    from scratchlm.data import TextDataModule

    def data_module() -> TextDataModule:
        data = TextDataModule(
            paths=[corpus], tokenizer=tokenizer, val_fraction=0.2, block_size=block_size,
            batch_size=3, num_workers=2, train_epochs=1,
        )
        data.setup("fit")
        return data

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        first = data_module()
        vocab = {i: t for t, i in first.tokenizer_info.tokenizer().get_vocab().items()}
        seen = {"before": [], "after": []}
        for step, batch in enumerate(first.train_dataloader()):
            if step == stop_after:
                break
            seen["before"] += identities(batch["input_ids"].numpy(), vocab)
        resumed = data_module()
        resumed.load_state_dict({"batches": stop_after, **first.stream_layout()})
        for batch in resumed.train_dataloader():
            seen["after"] += identities(batch["input_ids"].numpy(), vocab)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, seen)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()
