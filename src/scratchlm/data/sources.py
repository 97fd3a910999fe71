"""Where documents come from: paths resolved to sources, and sources streamed as documents.

Nothing here loads a file whole: text files are read line by line (``.gz`` and ``.zst`` ones
decompressed as they stream), parquet in record batches, a ``save_to_disk`` folder through its
memory-mapped Arrow files, a Hub dataset in streaming mode. What counts as a document:

- ``.txt`` (also ``.txt.gz``, ``.txt.zst``): a paragraph, i.e. a run of non-blank lines; blank or
  whitespace-only lines separate documents. (A paragraph longer than ``MAX_DOCUMENT_CHARS`` is cut
  at a line boundary, so one file without blank lines cannot fill memory.)
- ``.jsonl`` / ``.json`` (JSON lines; also ``.gz``, ``.zst``): one JSON object per line, its
  ``text_field`` holding the text. Empty lines are skipped.
- ``.parquet``, ``save_to_disk`` folders, ``datasets:NAME[:SPLIT]``: one row, its ``text_field``
  column holding the text.
- a prepared folder (``scratchlm prepare``, see ``data.prepared``): its documents as token ids,
  memory-mapped, for the callers that take ids (``iter_documents(..., token_ids=True)``).
- the built-in corpus: one topic of the Python reference documentation that ships with CPython
  (``pydoc_data.topics``), in topic-name order.

Empty and whitespace-only texts are not documents. Every problem with the input is a
:class:`ScratchLMError` that names the file and 1-based line (or row) and says what to do.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Literal
import zlib

import numpy as np

from scratchlm.errors import ScratchLMError

BUILTIN = "builtin"
"""The path that names the built-in corpus (also what no paths at all mean)."""

HUB_PREFIX = "datasets:"
"""Paths that start with this name a dataset for ``datasets.load_dataset``: ``datasets:NAME[:SPLIT]``."""

SUFFIX_KINDS = {
    ".txt": "text", ".txt.gz": "text", ".txt.zst": "text",
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl",
    ".json": "jsonl", ".json.gz": "jsonl", ".json.zst": "jsonl",
    ".parquet": "parquet",
}
"""File name ending -> how to read it."""

BINARY_SNIFF = 8192
"""Bytes read from the start of a text file to tell whether it is binary (has NUL bytes)."""

MAX_DOCUMENT_CHARS = 1_000_000
"""A ``.txt`` paragraph grows no longer than this; beyond it a new document starts at the next line."""

PREPARED_METADATA = "prepared.json"
"""The file that marks a folder written by ``scratchlm prepare`` (see ``data.prepared``)."""

Errors = Literal["strict", "replace"]
SourceKind = Literal["builtin", "text", "jsonl", "parquet", "saved", "hub", "prepared"]


@dataclass(frozen=True)
class Source:
    """One place documents come from."""

    kind: SourceKind
    """How to read it: the built-in corpus, a file by type, a ``save_to_disk`` folder, a Hub dataset."""
    location: str
    """File or folder path; the dataset name for ``hub``; ``BUILTIN`` for the built-in corpus."""
    split: str | None = None
    """Split to read (``hub`` only)."""
    part: int | None = None
    """Which of the sources a prepared folder was prepared from (``prepared`` only)."""

    def __str__(self) -> str:
        if self.kind == "hub":
            return f"{HUB_PREFIX}{self.location}:{self.split}"
        if self.kind == "prepared":
            return f"{self.location} (prepared, part {self.part + 1})"
        return "the built-in corpus" if self.kind == "builtin" else self.location


@dataclass(frozen=True, slots=True)
class Document:
    """One document's text and where it came from."""

    text: str
    """The text, never empty or only whitespace."""
    source: str
    """The file (or dataset) it came from, as given."""
    line: int
    """1-based: first line for .txt/.jsonl, row for parquet/datasets, topic number for the built-in
    corpus, document number within its source for a prepared corpus."""
    ids: np.ndarray | None = None
    """Token ids, for a document of a prepared corpus (its ``text`` is then empty)."""
    word_starts: np.ndarray | None = None
    """Which of ``ids`` begin a word (prepared corpora)."""
    score: float | None = None
    """Its ``data.stream.validation_score`` where stored (prepared corpora); else the text gives it."""


# --- resolving paths ---------------------------------------------------------------------------


def resolve_sources(paths: Sequence[str] | None, flag: str = "--data.paths") -> list[Source]:
    """Turn ``--data.paths`` into sources, in a deterministic order (each as given; folders and
    globs sorted), each file once. None or empty means the built-in corpus. Errors name ``flag``
    (``--data.val_paths`` for held-out files).

    A path is a file, a folder (searched recursively for supported files; hidden ones skipped), a
    glob (``*``, ``?``, ``**``), a ``save_to_disk`` folder (a Dataset, or a DatasetDict whose
    ``train`` split is read), ``builtin``, or ``datasets:NAME[:SPLIT]``."""
    if isinstance(paths, str):  # one path given where a list was meant
        paths = [paths]
    if not paths:
        return [Source("builtin", BUILTIN)]
    sources = [source for path in paths for source in resolve_path(str(path), flag)]
    return list(dict.fromkeys(sources))


def resolve_path(path: str, flag: str) -> list[Source]:
    if path == BUILTIN:
        return [Source("builtin", BUILTIN)]
    if path.startswith(HUB_PREFIX):
        return [hub_source(path, flag)]
    if any(char in path for char in "*?["):
        return resolve_glob(path, flag)
    found = Path(path).expanduser()
    if not found.exists():
        raise ScratchLMError(f"{flag}: {path!r} matches no file; check the path or quote the glob")
    if found.is_dir():
        return resolve_folder(found, path, flag)
    kind = kind_of(found)
    if kind is None:
        raise ScratchLMError(
            f"{flag}: {path} has an unsupported extension; use one of {', '.join(SUFFIX_KINDS)} "
            "(or a folder saved with datasets' save_to_disk)"
        )
    return [Source(kind, str(found))]


def hub_source(path: str, flag: str) -> Source:
    name, _, split = path[len(HUB_PREFIX):].partition(":")
    if not name:
        raise ScratchLMError(f"{flag}: {path!r} names no dataset; write datasets:NAME[:SPLIT]")
    return Source("hub", name, split or "train")


def resolve_glob(pattern: str, flag: str) -> list[Source]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    sources = []
    for match in map(Path, matches):
        kind = kind_of(match)
        if match.is_dir():
            sources += folder_sources(match)
        elif kind is not None:
            sources.append(Source(kind, str(match)))
    if not matches:
        raise ScratchLMError(f"{flag}: {pattern!r} matches no file; check the path or quote the glob")
    if not sources:
        raise ScratchLMError(
            f"{flag}: {pattern!r} matches {len(matches)} paths but no supported file "
            f"({', '.join(SUFFIX_KINDS)}); narrow or fix the glob"
        )
    return sources


def resolve_folder(folder: Path, given: str, flag: str) -> list[Source]:
    sources = folder_sources(folder)
    if not sources:
        raise ScratchLMError(
            f"{flag}: folder {given} holds no supported file ({', '.join(SUFFIX_KINDS)}); "
            "check the folder"
        )
    return sources


def folder_sources(folder: Path) -> list[Source]:
    """The sources in a folder and its subfolders, sorted by path; hidden entries are skipped, a
    ``save_to_disk`` folder is one source (its .json metadata is not text), and a prepared folder
    is the sources it was prepared from."""
    if is_saved_dataset(folder):
        return [Source("saved", str(folder))]
    if is_prepared(folder):
        return prepared_sources(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for d in [d for d in dirs if is_saved_dataset(Path(root, d))]:
            dirs.remove(d)
            found.append(Source("saved", str(Path(root, d))))
        for d in [d for d in dirs if is_prepared(Path(root, d))]:
            dirs.remove(d)
            found += prepared_sources(Path(root, d))
        for name in files:
            kind = kind_of(Path(name))
            if kind is not None and not name.startswith("."):
                found.append(Source(kind, str(Path(root, name))))
    return sorted(found, key=lambda s: Path(s.location).parts)


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    if (folder / "dataset_dict.json").is_file():
        return True
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def is_prepared(folder: Path) -> bool:
    """A folder written by ``scratchlm prepare``."""
    return (folder / PREPARED_METADATA).is_file()


def prepared_sources(folder: Path) -> list[Source]:
    """A prepared folder as sources, one per source it was prepared from, so that the per-epoch
    order of files is drawn over the same list as for the original files."""
    from scratchlm.data.prepared import open_prepared  # data.prepared imports this module

    parts = len(open_prepared(folder).source_names)
    return [Source("prepared", str(folder), part=part) for part in range(parts)]


def kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in SUFFIX_KINDS.items():
        if name.endswith(suffix):
            return kind
    return None


def describe_sources(sources: Sequence[Source], limit: int = 3) -> str:
    """A short human description of a corpus, e.g. for a model card: file names, or the built-in corpus."""
    if [s.kind for s in sources] == ["builtin"]:
        return "built-in corpus (the Python reference documentation shipped with CPython)"
    names = list(dict.fromkeys(source_name(s) for s in sources))
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def source_name(source: Source) -> str:
    if source.kind == "hub":
        return str(source)
    if source.kind == "prepared":
        from scratchlm.data.prepared import open_prepared  # data.prepared imports this module

        return Path(open_prepared(source.location).source_names[source.part]).name
    return Path(source.location).name


# --- reading documents -------------------------------------------------------------------------


def iter_documents(
    sources: Sequence[Source], *, text_field: str = "text", errors: Errors = "strict", token_ids: bool = False
) -> Iterator[Document]:
    """Stream the documents of ``sources`` in order; see the module doc for what a document is.

    ``errors="strict"`` stops at the first line that is not UTF-8; ``"replace"`` reads it with U+FFFD.
    ``token_ids``: the caller takes token ids, so a prepared corpus may be among the sources (its
    documents come with ``ids`` and no text); otherwise one is refused, naming it."""
    if errors not in ("strict", "replace"):
        raise ScratchLMError(f"--data.errors={errors!r}: choose strict or replace")
    for source in sources:
        if source.kind == "prepared" and not token_ids:
            raise ScratchLMError(
                f"{source.location} is a prepared corpus (token ids), and this step reads text; pass "
                f"the files it was prepared from instead (its {PREPARED_METADATA} lists them)"
            )
        for document in READERS[source.kind](source, text_field, errors):
            if document.ids is not None or (document.text and not document.text.isspace()):
                yield document


def first_document(
    sources: Sequence[Source], *, text_field: str = "text", errors: Errors = "strict", token_ids: bool = False
) -> Document:
    """The corpus's first document: a cheap check, before training, that there is any text
    (``token_ids``: as ``iter_documents``)."""
    for document in iter_documents(sources, text_field=text_field, errors=errors, token_ids=token_ids):
        return document
    shown = ", ".join(map(str, sources[:3])) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
    raise ScratchLMError(
        f"no documents in {shown}: every file is empty or holds only whitespace "
        f"(or empty {text_field!r} fields); add text or fix --data.paths"
    )


def read_builtin(source: Source, text_field: str, errors: Errors) -> Iterator[Document]:
    from pydoc_data.topics import topics

    for index, name in enumerate(sorted(topics)):
        yield Document(topics[name], BUILTIN, index + 1)


def read_text(source: Source, text_field: str, errors: Errors) -> Iterator[Document]:
    """Paragraphs: runs of non-blank lines, each one document, numbered by its first line."""
    lines: list[str] = []
    start = size = 0
    for number, line in decoded_lines(source.location, errors):
        if line.isspace() or not line:
            if lines:
                yield Document("\n".join(lines), source.location, start)
            lines = []
            continue
        if not lines:
            start, size = number, 0
        lines.append(line.rstrip("\r\n"))
        size += len(line)
        if size >= MAX_DOCUMENT_CHARS:
            yield Document("\n".join(lines), source.location, start)
            lines = []
    if lines:
        yield Document("\n".join(lines), source.location, start)


def read_jsonl(source: Source, text_field: str, errors: Errors) -> Iterator[Document]:
    path = source.location
    for number, line in decoded_lines(path, errors):
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))  # so an error's column is on this line
        except json.JSONDecodeError as error:
            raise ScratchLMError(
                f"{path}:{number}: malformed JSON ({error.msg}, column {error.colno}); fix or remove "
                "that line (each line of a JSON Lines file holds one JSON object)"
            ) from None
        yield Document(text_of(record, f"{path}:{number}", text_field, "line"), path, number)


def read_parquet(source: Source, text_field: str, errors: Errors) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = source.location
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise ScratchLMError(f"{path}: not a readable parquet file ({reason(error)}); check or rewrite it") from None
    schema = table.schema_arrow
    check_column(path, schema.names, text_field)
    column_type = schema.field(text_field).type
    if not is_text_type(column_type):
        raise ScratchLMError(
            f"{path}: column {text_field!r} holds {column_type}, not strings; pass --data.text_field "
            "naming a text column"
        )
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            yield Document(text_of({text_field: text}, f"{path} row {row}", text_field, "row"), path, row)


def read_saved(source: Source, text_field: str, errors: Errors) -> Iterator[Document]:
    """A ``save_to_disk`` folder; its Arrow files are memory-mapped, not read into memory."""
    import datasets

    path = source.location
    try:
        dataset = datasets.load_from_disk(path)
    except Exception as error:  # datasets raises several types for a damaged folder
        raise ScratchLMError(f"{path}: cannot be loaded with datasets.load_from_disk ({reason(error)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ScratchLMError(
                f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(dataset)}); "
                "save the split to train on as 'train'"
            )
        dataset = dataset["train"]
    check_column(path, dataset.column_names, text_field)
    row = 0
    for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
        for text in batch[text_field]:
            row += 1
            yield Document(text_of({text_field: text}, f"{path} row {row}", text_field, "row"), path, row)


def read_hub(source: Source, text_field: str, errors: Errors) -> Iterator[Document]:
    """A dataset by name, streamed: only as much is downloaded as is read."""
    import datasets

    where = str(source)
    try:
        rows = datasets.load_dataset(source.location, split=source.split, streaming=True)
    except Exception as error:  # unknown name, split, network: datasets raises many types
        raise ScratchLMError(
            f"{where} cannot be loaded ({reason(error)}); check the name and split, or "
            "save the dataset with save_to_disk and pass that folder"
        ) from None
    for row, record in enumerate(rows, start=1):
        yield Document(text_of(record, f"{where} row {row}", text_field, "row"), where, row)


def read_prepared(source: Source, text_field: str, errors: Errors) -> Iterator[Document]:
    """One part of a prepared corpus: documents as token ids, memory-mapped (see ``data.prepared``)."""
    from scratchlm.data.prepared import open_prepared  # data.prepared imports this module

    return open_prepared(source.location).documents(source.part)


READERS: dict[str, Callable[[Source, str, Errors], Iterator[Document]]] = {
    "builtin": read_builtin,
    "text": read_text,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "saved": read_saved,
    "hub": read_hub,
    "prepared": read_prepared,
}
"""Source kind -> reader yielding its documents (possibly blank; ``iter_documents`` drops those)."""


# --- shared checks -----------------------------------------------------------------------------


def decoded_lines(path: str, errors: Errors) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line, newline kept. Decoded line by line, so an undecodable
    byte is reported at its line, and memory holds one line at a time."""
    check_not_binary(path)
    try:
        with open_binary(path) as stream:
            for number, raw in enumerate(stream, start=1):
                yield number, decode_line(raw, path, number, errors)
    except DECOMPRESSION_ERRORS as error:
        raise unreadable_compressed(path, error) from None


def decode_line(raw: bytes, path: str, number: int, errors: Errors) -> str:
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as error:
        raise ScratchLMError(
            f"{path}:{number}: byte 0x{raw[error.start]:02x} at column {error.start + 1} is not UTF-8; "
            "re-encode the file as UTF-8 (e.g. iconv -t utf-8) or pass --data.errors replace"
        ) from None
    # A byte-order mark is an encoding marker, not text (and json.loads rejects it).
    return text[1:] if number == 1 and text.startswith("\ufeff") else text


def open_binary(path: str) -> io.BufferedIOBase:
    """The file's bytes, decompressed as they are read for ``.gz`` and ``.zst``; iterating yields
    lines. A damaged compressed file raises one of ``DECOMPRESSION_ERRORS`` while it is read."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(ZstdReader(path))
    return open(path, "rb")


class ZstdReader(io.RawIOBase):
    """A ``.zst`` file's decompressed bytes, streamed frame after frame (a file may hold several).

    Built on zstandard's ``decompressobj`` rather than its ``stream_reader``: the latter ends
    quietly when the file ends inside a frame (zstandard 0.25), so a truncated download would lose
    its tail unnoticed. Here that raises EOFError, as gzip does. A frame is complete when its
    decompressor reports ``eof`` (zstd returns 0 exactly at a frame's end: facebook/zstd#1109)."""

    READ_SIZE = 1 << 16
    """Compressed bytes read from the file at a time."""

    def __init__(self, path: str) -> None:
        import zstandard  # only when a .zst file is read, as pyarrow and datasets are for theirs

        super().__init__()
        self.file = open(path, "rb")  # noqa: SIM115  (held open while streaming; closed in close())
        self.decompressor = zstandard.ZstdDecompressor()
        self.damaged = zstandard.ZstdError
        self.frame: Any = None  # the current frame's decompressobj; None before the first byte
        self.ready = memoryview(b"")  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.ready:
            compressed = self.file.read(self.READ_SIZE)
            if not compressed:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError("compressed file ended before the end of a zstd frame")
                return 0
            self.ready = memoryview(self.decompress(compressed))
        size = min(len(buffer), len(self.ready))
        buffer[:size] = self.ready[:size]
        self.ready = self.ready[size:]
        return size

    def decompress(self, compressed: bytes) -> bytes:
        parts = []
        while compressed:
            if self.frame is None or self.frame.eof:
                self.frame = self.decompressor.decompressobj()
            try:
                parts.append(self.frame.decompress(compressed))
            except self.damaged as error:
                raise ZstdDamaged(str(error)) from None
            compressed = self.frame.unused_data if self.frame.eof else b""  # the next frame's start
        return b"".join(parts)

    def close(self) -> None:
        self.file.close()
        super().close()


class ZstdDamaged(ValueError):
    """zstandard's error for bytes that are no valid zstd data, under a name this module owns."""


DECOMPRESSION_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, ZstdDamaged)
"""What reading a damaged, truncated or mislabelled ``.gz`` or ``.zst`` file raises."""


def unreadable_compressed(path: str, error: BaseException) -> ScratchLMError:
    codec = "zstd" if path.lower().endswith(".zst") else "gzip"
    return ScratchLMError(f"{path}: not a readable {codec} file ({reason(error)}); check or recompress it")


def check_not_binary(path: str) -> None:
    try:
        with open_binary(path) as stream:
            head = stream.read(BINARY_SNIFF)
    except DECOMPRESSION_ERRORS as error:
        raise unreadable_compressed(path, error) from None
    if b"\x00" in head:
        raise ScratchLMError(
            f"{path}: looks binary (NUL bytes in its first {BINARY_SNIFF // 1024} KiB), not text; "
            "remove it from --data.paths (UTF-16 text: re-encode it as UTF-8)"
        )


def check_column(path: str, names: Sequence[str], text_field: str) -> None:
    if text_field not in names:
        raise ScratchLMError(
            f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
            "pass --data.text_field NAME"
        )


def reason(error: BaseException) -> str:
    """A library's error as a short clause: its first line (messages here are one line)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    is_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow >= 16
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or is_view(arrow_type)


JSON_TYPES = {dict: "object", list: "array", int: "number", float: "number", bool: "boolean", type(None): "null"}


def text_of(record: Any, where: str, text_field: str, unit: str) -> str:
    """The text field of one JSON line or row, or an error naming ``where`` (file:line or row)."""
    if not isinstance(record, dict):
        kind = JSON_TYPES.get(type(record), type(record).__name__)
        raise ScratchLMError(
            f"{where}: a JSON {kind}, not an object with a {text_field!r} field; fix or remove that {unit}"
        )
    if text_field not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise ScratchLMError(
            f"{where}: no {text_field!r} field (fields: {fields}); pass --data.text_field NAME"
        )
    text = record[text_field]
    if not isinstance(text, str):
        kind = JSON_TYPES.get(type(text), type(text).__name__)
        raise ScratchLMError(
            f"{where}: field {text_field!r} is a {kind}, not a string; fix or remove that {unit}"
        )
    return text
