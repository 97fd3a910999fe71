"""Text in, packed token blocks out: sources -> tokenize (in DataLoader workers, or once ahead with
``prepare_corpus``) -> pack -> batch.

Nothing here knows about objectives; the training module hands the data module its collate.
"""

from scratchlm.data.module import TextDataModule, collate_blocks
from scratchlm.data.packing import Packer, pack_documents
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
