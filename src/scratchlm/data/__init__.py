"""Text in, packed token blocks out: sources -> tokenize (in DataLoader workers, or once ahead with
``prepare_corpus``) -> pack -> batch.

Nothing here knows about objectives; the training module hands the data module its collate.
"""

from scratchlm.data.packing import Packer, collate_blocks, pack_documents
from scratchlm.data.prepared import prepare_corpus
from scratchlm.data.sources import (
    BUILTIN,
    Document,
    Source,
    describe_sources,
    first_document,
    iter_documents,
    resolve_sources,
)
from scratchlm.data.stream import PackedBlocks, validation_score

__all__ = [
    "BUILTIN",
    "Document",
    "PackedBlocks",
    "Packer",
    "Source",
    "TextDataModule",
    "collate_blocks",
    "describe_sources",
    "first_document",
    "iter_documents",
    "pack_documents",
    "prepare_corpus",
    "resolve_sources",
    "validation_score",
]


def __getattr__(name: str):
    """``TextDataModule`` is imported on first use: it brings Lightning, whose import takes seconds
    that the commands which do not train (tokenizer, prepare, export) need not wait for."""
    if name == "TextDataModule":
        from scratchlm.data.module import TextDataModule

        return TextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
