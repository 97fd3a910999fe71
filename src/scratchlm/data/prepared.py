"""Prepared corpora: a corpus tokenized once into flat binary files, read back through memory maps.

``scratchlm prepare`` runs the pipeline's tokenization over a whole corpus once and writes what it
yields; ``fit`` takes the folder wherever it takes text (``--data.paths DIR``) and its loader
workers slice token ids out of memory-mapped files instead of reading, decoding and tokenizing
text. The stream is the same, block for block: the same documents in the same order, the same
held-out split (each document's validation score is kept), the same per-epoch order of the
original files and the same shard assignment, the same word starts. Nothing is loaded whole.

A prepared folder holds:

- ``prepared.json``: format and version, the token dtype, counts, the fingerprint of the tokenizer,
  and the sources it was prepared from (as given and as absolute paths) with their numbers of
  documents. Written last: a folder without it is no prepared corpus.
- ``tokens.bin``: every document's ids end to end, as ``data.stream.tokenize`` yields them (special
  tokens and the closing separator included): uint16 where the vocabulary fits, else uint32.
- ``offsets.bin``: int64, one more than there are documents: document ``i`` is
  ``tokens[offsets[i]:offsets[i + 1]]``.
- ``scores.bin``: float64, each document's ``validation_score``.
- ``word_starts.bin``: which tokens begin a word, one bit per token (``numpy.packbits`` order).
- ``tokenizer/``: the tokenizer it was prepared with; ``fit`` uses it when ``--data.tokenizer`` is unset.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
import functools
import hashlib
import itertools
import json
from pathlib import Path
import time

import numpy as np

from scratchlm.data.sources import (
    PREPARED_METADATA,
    Document,
    Errors,
    Source,
    first_document,
    iter_documents,
    resolve_sources,
)
from scratchlm.data.stream import document_separator, tokenize, validation_score
from scratchlm.errors import ScratchLMError
from scratchlm.folders import check_destination, flush_to_disk, replace_folder, staging_folder
from scratchlm.tokenizer import TokenizerInfo, write_tokenizer_files

FORMAT = "scratchlm-prepared"
VERSION = 1

FILES = {"tokens": "tokens.bin", "offsets": "offsets.bin", "scores": "scores.bin", "word_starts": "word_starts.bin"}
"""Array name -> file; with ``prepared.json`` and ``tokenizer/``, all a prepared folder holds."""

PREPARE_BATCH = 1024
"""Documents per ``encode_batch`` call while preparing (the tokenizer's threads share each batch)."""

READ_CHUNK = 4096
"""Documents whose offsets and scores are read from the maps at a time."""


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type that holds every id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def tokenizer_fingerprint(info: TokenizerInfo) -> str:
    """sha256 of the tokenizer's ``tokenizer.json``: the ids mean the same only under the same one."""
    return hashlib.sha256(info.file_texts["tokenizer.json"].encode("utf-8")).hexdigest()


# --- writing -----------------------------------------------------------------------------------


class _Writer:
    """Appends tokenized documents to the folder's files as they come, in bounded memory."""

    def __init__(self, folder: Path, dtype: str) -> None:
        self.dtype = np.dtype(dtype)
        self.files = {name: open(folder / file, "wb") for name, file in FILES.items()}
        self.files["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
        self.tokens = 0
        self.documents = 0
        self.pending_starts = np.zeros(0, dtype=np.bool_)  # fewer than 8 bits not yet packed

    def add(self, encoded: Sequence[tuple[list[int], np.ndarray]], scores: Sequence[float]) -> None:
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in encoded), dtype=np.int64, count=int(lengths.sum()))
        self.files["tokens"].write(ids.astype(self.dtype).tobytes())
        self.files["offsets"].write((self.tokens + np.cumsum(lengths)).tobytes())
        self.files["scores"].write(np.asarray(scores, dtype=np.float64).tobytes())
        starts = np.concatenate([self.pending_starts, *(s for _, s in encoded)])
        whole = len(starts) // 8 * 8
        self.files["word_starts"].write(np.packbits(starts[:whole]).tobytes())
        self.pending_starts = starts[whole:]
        self.tokens += len(ids)
        self.documents += len(encoded)

    def close(self) -> None:
        self.files["word_starts"].write(np.packbits(self.pending_starts).tobytes())
        for file in self.files.values():
            file.close()


def prepare_corpus(
    paths: Sequence[str] | str | None,
    tokenizer: str | Path,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    errors: Errors = "strict",
    overwrite: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Tokenize the corpus at ``paths`` (as ``--data.paths`` takes it) with the tokenizer folder
    ``tokenizer`` into a prepared folder at ``out_dir``, streaming; return its ``prepared.json``.

    The folder appears whole or not at all: a bad line met halfway, a crash or a kill leaves
    ``out_dir`` as it was. ``overwrite`` replaces a previous prepared folder, never anything
    else. ``progress(documents, tokens, seconds)`` is called after each batch."""
    info = TokenizerInfo.load(tokenizer)
    out = Path(out_dir).resolve()
    check_destination(
        out, label="prepare output", what="a prepared corpus", owned={PREPARED_METADATA, "tokenizer", *FILES.values()},
        overwrite_flag="--overwrite", overwrite=overwrite,
    )
    check_outside_inputs(out, paths)
    sources = resolve_sources(paths)
    first_document(sources, text_field=text_field, errors=errors)  # fails before writing anything
    out.parent.mkdir(parents=True, exist_ok=True)
    encoder, separator = info.tokenizer(), document_separator(info)
    started = time.perf_counter()
    with staging_folder(out) as staging:
        writer = _Writer(staging, token_dtype(info.vocab_size))
        parts = []
        try:
            for source in sources:
                count = 0
                documents = iter_documents([source], text_field=text_field, errors=errors)
                while batch := list(itertools.islice(documents, PREPARE_BATCH)):
                    texts = [document.text for document in batch]
                    encoded = list(tokenize(texts, encoder, separator, len(texts), word_starts=True))
                    writer.add(encoded, [validation_score(text) for text in texts])
                    count += len(batch)
                    if progress is not None:
                        progress(writer.documents, writer.tokens, time.perf_counter() - started)
                parts.append({"source": str(source), "path": file_path(source), "documents": count})
        finally:
            writer.close()
        write_tokenizer_files(info.files(), staging / "tokenizer")
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": str(writer.dtype),
            "documents": writer.documents,
            "tokens": writer.tokens,
            "vocab_size": info.vocab_size,
            "tokenizer_sha256": tokenizer_fingerprint(info),
            "text_field": text_field,
            "sources": parts,
        }
        (staging / PREPARED_METADATA).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
        flush_to_disk(staging)
        replace_folder(staging, out)
    return metadata


def check_outside_inputs(out: Path, paths: Sequence[str] | str | None) -> None:
    """Refuse an output folder inside a folder of the corpus: the next ``fit`` or ``prepare`` of
    that folder would read the corpus twice, as text and as ids."""
    for path in [paths] if isinstance(paths, str) else paths or []:
        folder = Path(path).expanduser().resolve()
        if folder.is_dir() and out.is_relative_to(folder):
            raise ScratchLMError(
                f"prepare output {out} lies inside the corpus folder {path}, which would then read it "
                "as part of the corpus; choose a folder outside it"
            )


def file_path(source: Source) -> str | None:
    """The absolute path of a file-backed source (None for the built-in corpus and Hub datasets):
    what ``check_read_once`` compares."""
    return str(Path(source.location).resolve()) if source.kind in ("text", "jsonl", "parquet", "saved") else None


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedCorpus:
    """A prepared folder, its arrays memory-mapped (read-only, so forked loader workers share
    the pages)."""

    folder: str
    metadata: dict
    tokens: np.ndarray
    offsets: np.ndarray
    scores: np.ndarray
    word_start_bits: np.ndarray

    @property
    def source_names(self) -> list[str]:
        """The sources it was prepared from, in order: the parts of the corpus."""
        return [part["source"] for part in self.metadata["sources"]]

    def part_range(self, part: int) -> range:
        """The document indices of one part."""
        counts = [entry["documents"] for entry in self.metadata["sources"]]
        start = sum(counts[:part])
        return range(start, start + counts[part])

    def documents(self, part: int) -> Iterator[Document]:
        """The documents of one part, as token ids with their word starts and validation score
        (and empty text); ``line`` is the document's number within its source."""
        indices = self.part_range(part)
        name = self.source_names[part]
        for first in range(indices.start, indices.stop, READ_CHUNK):
            last = min(indices.stop, first + READ_CHUNK)
            offsets = np.asarray(self.offsets[first : last + 1])
            scores = self.scores[first:last].tolist()
            for i in range(last - first):
                lo, hi = int(offsets[i]), int(offsets[i + 1])
                yield Document(
                    "", name, first + i - indices.start + 1,
                    ids=self.tokens[lo:hi], word_starts=self.word_starts(lo, hi), score=scores[i],
                )

    def word_starts(self, lo: int, hi: int) -> np.ndarray:
        """The word-start flags of tokens ``lo`` to ``hi``."""
        bits = np.unpackbits(self.word_start_bits[lo // 8 : (hi + 7) // 8])
        return bits[lo % 8 : lo % 8 + hi - lo].view(np.bool_)


def open_prepared(folder: str | Path) -> PreparedCorpus:
    """The prepared corpus in ``folder``, checked whole (format, version, file sizes) so that a
    damaged or incomplete folder is named before training starts, not halfway through it."""
    folder = Path(folder)
    metadata_path = folder / PREPARED_METADATA
    try:
        stamp = metadata_path.stat()
    except OSError:
        raise ScratchLMError(f"{folder} holds no {PREPARED_METADATA}; prepare it with scratchlm prepare") from None
    return _open_prepared(str(folder), (stamp.st_ino, stamp.st_mtime_ns, stamp.st_size))


@functools.lru_cache(maxsize=16)
def _open_prepared(folder: str, stamp: tuple) -> PreparedCorpus:
    """Cached per folder and state of its metadata: a folder prepared again is opened again."""
    del stamp
    metadata = read_metadata(Path(folder))
    arrays = {}
    sizes = {
        "tokens": (metadata["dtype"], metadata["tokens"]),
        "offsets": ("int64", metadata["documents"] + 1),
        "scores": ("float64", metadata["documents"]),
        "word_starts": ("uint8", (metadata["tokens"] + 7) // 8),
    }
    for name, (dtype, count) in sizes.items():
        path = Path(folder) / FILES[name]
        expected = count * np.dtype(dtype).itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            found = "is missing" if actual is None else f"has {actual} bytes, not {expected}"
            raise ScratchLMError(f"{path} {found}: the prepared folder is damaged; prepare it again")
        arrays[name] = np.memmap(path, dtype=dtype, mode="r") if count else np.zeros(0, dtype=dtype)
    return PreparedCorpus(
        folder, metadata, arrays["tokens"], arrays["offsets"], arrays["scores"], arrays["word_starts"]
    )


def read_metadata(folder: Path) -> dict:
    path = folder / PREPARED_METADATA
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ScratchLMError(f"{path} cannot be read ({type(error).__name__}); prepare the folder again") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ScratchLMError(f"{path} does not describe a scratchlm prepared corpus; prepare the folder again")
    if metadata.get("version") != VERSION:
        raise ScratchLMError(
            f"{path} is format version {metadata.get('version')}, this scratchlm reads version {VERSION}; "
            "prepare the folder again"
        )
    return metadata


def prepared_folders(sources: Sequence[Source]) -> list[PreparedCorpus]:
    """The prepared corpora among ``sources``, each once."""
    folders = dict.fromkeys(source.location for source in sources if source.kind == "prepared")
    return [open_prepared(folder) for folder in folders]


def check_read_once(sources: Sequence[Source]) -> None:
    """Refuse a corpus that holds a file twice, as text and inside a prepared corpus made from it
    (or inside two): each of its documents would be trained on twice."""
    seen: dict[str, str] = {}  # absolute path -> how it is read
    readings = [(file_path(s), "as text") for s in sources if s.kind != "prepared"]
    readings += [(part.get("path"), f"in the prepared corpus {corpus.folder}")
                 for corpus in prepared_folders(sources) for part in corpus.metadata["sources"]]
    for path, how in readings:
        if path is None:
            continue
        if path in seen:
            raise ScratchLMError(
                f"{path} would be read twice, {seen[path]} and {how}; pass only one of them in --data.paths"
            )
        seen[path] = how


def check_tokenizer(sources: Sequence[Source], info: TokenizerInfo) -> None:
    """Refuse to train on a prepared corpus with another tokenizer than it was prepared with: its
    ids would mean other tokens."""
    fingerprint = tokenizer_fingerprint(info)
    for corpus in prepared_folders(sources):
        if corpus.metadata["tokenizer_sha256"] != fingerprint:
            raise ScratchLMError(
                f"{corpus.folder} was prepared with another tokenizer than {info.path}; pass "
                f"--data.tokenizer {Path(corpus.folder) / 'tokenizer'} or prepare it again with this one"
            )


def default_tokenizer(paths: Sequence[str] | str | None) -> str | None:
    """The tokenizer of the first prepared corpus among ``paths``, if any: what ``fit`` trains
    with when ``--data.tokenizer`` is unset."""
    corpora = prepared_folders(resolve_sources(paths))
    return str(Path(corpora[0].folder) / "tokenizer") if corpora else None
