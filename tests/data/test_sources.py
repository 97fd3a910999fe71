"""Sources: every supported form of input streams as documents; bad input stops with one line
that names the file and line (or row) and says what to do."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scratchlm.data.sources import (
    BUILTIN,
    describe_sources,
    first_document,
    iter_documents,
    resolve_sources,
)
from scratchlm.errors import ScratchLMError


def documents(paths, **options) -> list[tuple[str, str, int]]:
    """(text, file name, line) of every document of ``paths``."""
    return [(d.text, Path(d.source).name, d.line) for d in iter_documents(resolve_sources(paths), **options)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- the forms of input ------------------------------------------------------------------------


def test_txt_paragraphs_are_documents_numbered_by_their_first_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufefffirst line\nsame paragraph\r\n\r\n\n  \t\nsecond\n   indented code\n\n".encode())
    assert documents([str(path)]) == [
        ("first line\nsame paragraph", "notes.txt", 1),
        ("second\n   indented code", "notes.txt", 6),
    ]


def test_jsonl_gz_and_json_lines_with_empty_lines_and_blank_texts_skipped(tmp_path):
    plain = write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": 1}, {"text": "  "}, {"text": "two"}])
    with open(plain, "a") as f:
        f.write("\n" + json.dumps({"text": "three"}) + "\n")
    packed = tmp_path / "b.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "zipped é"}) + "\n")
    lines = write_jsonl(tmp_path / "c.json", [{"body": "json lines"}])
    assert documents([str(plain)]) == [("one", "a.jsonl", 1), ("two", "a.jsonl", 3), ("three", "a.jsonl", 5)]
    assert documents([str(packed), str(lines)], text_field="body") == [
        ("zipped é", "b.jsonl.gz", 1), ("json lines", "c.json", 1)
    ]


def test_parquet_rows_stream_from_the_text_column(tmp_path):
    path = tmp_path / "rows.parquet"
    table = pa.table({"id": list(range(2500)), "content": [f"row {i}" for i in range(2500)]})
    pq.write_table(table, path, row_group_size=700)
    found = documents([str(path)], text_field="content")
    assert len(found) == 2500
    assert found[0] == ("row 0", "rows.parquet", 1) and found[-1] == ("row 2499", "rows.parquet", 2500)


def test_folders_are_searched_recursively_in_sorted_order_and_globs_expand(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b" / "deep").mkdir(parents=True)
    (corpus / ".hidden").mkdir()
    (corpus / "b" / "deep" / "z.txt").write_text("deep")
    (corpus / "b" / "a.txt").write_text("b/a")
    (corpus / "a.txt").write_text("top")
    (corpus / "README.md").write_text("not a supported file")
    (corpus / ".hidden" / "x.txt").write_text("hidden")
    (corpus / ".secret.txt").write_text("hidden too")
    assert [t for t, _, _ in documents([str(corpus)])] == ["top", "b/a", "deep"]
    assert [t for t, _, _ in documents([str(corpus / "**" / "*.txt")])] == ["top", "b/a", "deep"]
    # Named twice (a folder and a file in it): read once.
    assert [t for t, _, _ in documents([str(corpus), str(corpus / "a.txt")])] == ["top", "b/a", "deep"]


def test_save_to_disk_folders_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["alpha", "", "beta"]}).save_to_disk(str(single))
    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["train doc"]}),
         "test": datasets.Dataset.from_dict({"text": ["test doc"]})}
    ).save_to_disk(str(splits))
    assert documents([str(single)]) == [("alpha", "single", 1), ("beta", "single", 3)]
    assert documents([str(splits)]) == [("train doc", "splits", 1)]
    # Inside a folder, a saved dataset is one source: its .json metadata is not read as text.
    (tmp_path / "notes.txt").write_text("notes")
    assert [t for t, _, _ in documents([str(tmp_path)])] == ["notes", "alpha", "beta", "train doc"]


def test_datasets_name_streams_with_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "local"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "streamed one"}, {"text": "streamed two"}])
    found = list(iter_documents(resolve_sources([f"datasets:{folder}"])))
    assert [(d.text, d.line) for d in found] == [("streamed one", 1), ("streamed two", 2)]
    with pytest.raises(ScratchLMError, match="no-such-split"):
        list(iter_documents(resolve_sources([f"datasets:{folder}:no-such-split"])))


def test_builtin_corpus_is_the_python_reference_in_topic_order():
    from pydoc_data.topics import topics

    for paths in (None, [], [BUILTIN]):
        found = list(iter_documents(resolve_sources(paths)))
        assert [d.text for d in found] == [topics[name] for name in sorted(topics)]
        assert [d.line for d in found] == list(range(1, len(topics) + 1))
    assert len(found) > 50 and sum(len(d.text.split()) for d in found) > 50_000
    assert "built-in" in describe_sources(resolve_sources(None))


def test_errors_replace_reads_undecodable_bytes_as_replacement_characters(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert documents([str(path)], errors="replace") == [("caf\ufffd au lait", "latin1.txt", 1)]


def test_first_document_names_an_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('\n{"text": "   "}\n')
    with pytest.raises(ScratchLMError, match=r"no documents in .*empty\.txt.*blank\.jsonl"):
        first_document(resolve_sources([str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl")]))
    (tmp_path / "blank.jsonl").write_text('{"text": "here"}\n')
    assert first_document(resolve_sources([str(tmp_path)])).text == "here"


# --- bad input ---------------------------------------------------------------------------------


def write_parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


BAD_INPUTS = {
    # name: (file name, bytes or writer, text_field, substrings the one-line message must hold)
    "not-utf8": ("latin1.txt", "first\n\ncaf\xe9\n".encode("latin-1"), "text",
                 ["latin1.txt:3", "UTF-8", "--data.errors replace"]),
    "not-utf8-jsonl": ("l.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "text", ["l.jsonl:2", "UTF-8"]),
    "binary": ("blob.txt", b"abc\x00\x01\x02", "text", ["blob.txt", "looks binary"]),
    "bad-json": ("broken.jsonl", b'{"text": "fine"}\n{"text": "oops"\n', "text",
                 ["broken.jsonl:2", "malformed JSON", "fix or remove that line"]),
    "not-object": ("list.jsonl", b'\n["text", "x"]\n', "text", ["list.jsonl:2", "array", "not an object"]),
    "missing-field": ("nofield.jsonl", b'{"body": "x", "id": 3}\n', "text",
                      ["nofield.jsonl:1", "'text'", "body, id", "--data.text_field"]),
    "not-string": ("num.jsonl", b'{"text": "ok"}\n{"text": 42}\n', "text", ["num.jsonl:2", "number", "not a string"]),
    "null-text": ("null.jsonl.gz", gzip.compress(b'{"text": null}\n'), "text", ["null.jsonl.gz:1", "null"]),
    "bad-gzip": ("torn.jsonl.gz", b"\x1f\x8b\x08\x00garbage", "text", ["torn.jsonl.gz", "gzip"]),
    "parquet-column": ("p.parquet", lambda p: write_parquet(p, body=["x"]), "text",
                       ["p.parquet", "'text'", "columns: body", "--data.text_field"]),
    "parquet-type": ("n.parquet", lambda p: write_parquet(p, text=[1, 2]), "text", ["n.parquet", "not strings"]),
    "parquet-null": ("q.parquet", lambda p: write_parquet(p, text=["a", None]), "text", ["q.parquet row 2", "null"]),
    "not-parquet": ("fake.parquet", b"not parquet at all", "text", ["fake.parquet", "parquet"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_file_and_line(case, tmp_path):
    name, content, text_field, expected = BAD_INPUTS[case]
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ScratchLMError) as error:
        list(iter_documents(resolve_sources([str(path)]), text_field=text_field))
    message = str(error.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message


def test_paths_that_match_nothing_or_an_unsupported_file_are_named(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing.txt"): ["missing.txt", "matches no file"],
        str(tmp_path / "nothing-*.txt"): ["nothing-*.txt", "matches no file", "quote the glob"],
        str(tmp_path / "*.csv"): ["*.csv", "no supported file"],
        str(tmp_path / "table.csv"): ["table.csv", "unsupported extension", ".jsonl"],
        str(tmp_path / "empty"): ["empty", "holds no supported file"],
        "datasets:": ["names no dataset"],
    }
    for path, expected in cases.items():
        with pytest.raises(ScratchLMError) as error:
            resolve_sources([path])
        for text in expected:
            assert text in str(error.value), str(error.value)


def test_a_dataset_dict_without_train_split_is_named(tmp_path):
    import datasets

    folder = tmp_path / "only-test"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(folder))
    with pytest.raises(ScratchLMError, match=r"only-test.*'train'.*splits: test"):
        list(iter_documents(resolve_sources([str(folder)])))


def test_a_paragraph_without_end_is_cut_at_line_boundaries(tmp_path, monkeypatch):
    import scratchlm.data.sources as sources

    monkeypatch.setattr(sources, "MAX_DOCUMENT_CHARS", 10)
    path = tmp_path / "wall.txt"
    path.write_text("aaaa\nbbbb\ncccc\ndddd\n")
    assert documents([str(path)]) == [("aaaa\nbbbb", "wall.txt", 1), ("cccc\ndddd", "wall.txt", 3)]


def test_describe_names_files_briefly(tmp_path):
    for name in "abcde":
        (tmp_path / f"{name}.txt").write_text(name)
    assert describe_sources(resolve_sources([str(tmp_path)])) == "a.txt, b.txt, c.txt and 2 more"


# --- zstd-compressed files ---------------------------------------------------------------------


def zst(*frames: bytes) -> bytes:
    """``frames`` compressed one zstd frame each, back to back (as pzstd and chunked writers do)."""
    import zstandard

    return b"".join(zstandard.ZstdCompressor().compress(frame) for frame in frames)


def test_zst_files_read_as_the_same_documents_as_their_plain_versions(tmp_path, monkeypatch):
    from scratchlm.data.sources import ZstdReader

    # Read a few bytes at a time, so lines and frames straddle reads.
    monkeypatch.setattr(ZstdReader, "READ_SIZE", 7)
    text = "\ufefffirst é\nsame paragraph\r\n\n  \nsecond\n   indented\n\nthird\n".encode()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in ["one é", "  ", "two", "three"]).encode()
    for name, plain in {"notes.txt": text, "rows.jsonl": lines, "rows.json": lines}.items():
        (tmp_path / name).write_bytes(plain)
        (tmp_path / f"{name}.zst").write_bytes(zst(plain[:20], plain[20:]))
        expected = [(t, f"{name}.zst", line) for t, _, line in documents([str(tmp_path / name)])]
        assert len(expected) == 3
        assert documents([str(tmp_path / f"{name}.zst")]) == expected


def test_zst_files_are_found_in_folders_and_by_globs(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "deep").mkdir(parents=True)
    (corpus / "deep" / "b.jsonl.zst").write_bytes(zst(b'{"text": "from b"}\n'))
    (corpus / "a.txt.zst").write_bytes(zst(b"from a\n"))
    (corpus / "c.jsonl").write_text('{"text": "from c"}\n')
    assert documents([str(corpus)]) == [("from a", "a.txt.zst", 1), ("from c", "c.jsonl", 1), ("from b", "b.jsonl.zst", 1)]
    assert documents([str(corpus / "**" / "*.zst")]) == [("from a", "a.txt.zst", 1), ("from b", "b.jsonl.zst", 1)]


def test_a_long_zst_file_cut_short_stops_with_its_name_after_its_complete_lines(tmp_path):
    records = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(2000)).encode()
    path = tmp_path / "cut.jsonl.zst"
    whole = zst(records[:20_000], records[20_000:])  # the cut lands in the second frame, past the binary sniff
    path.write_bytes(whole[:-30])
    read = []
    with pytest.raises(ScratchLMError) as error:
        read.extend(iter_documents(resolve_sources([str(path)])))
    assert str(error.value).startswith(f"{path}: not a readable zstd file (")
    assert str(error.value).endswith("; check or recompress it")
    assert "\n" not in str(error.value)
    assert read[0].text == "document number 0" and 300 < len(read) < 2000
    path.write_bytes(whole)
    assert len(list(iter_documents(resolve_sources([str(path)])))) == 2000


BAD_ZST = {
    # name: (file name, bytes, substrings the one-line message must hold)
    "plain-bytes": ("renamed.txt.zst", b"plain text, never compressed\n", ["renamed.txt.zst", "not a readable zstd file"]),
    "truncated": ("torn.jsonl.zst", zst(b'{"text": "a whole line"}\n' * 50)[:-5], ["torn.jsonl.zst", "zstd"]),
    "trailing-junk": ("junk.jsonl.zst", zst(b'{"text": "ok"}\n') + b"junk", ["junk.jsonl.zst", "zstd"]),
    "not-utf8": ("latin1.txt.zst", zst("first\n\ncaf\xe9\n".encode("latin-1")),
                 ["latin1.txt.zst:3", "UTF-8", "--data.errors replace"]),
    "not-utf8-jsonl": ("l.jsonl.zst", zst(b'{"text": "ok"}\n', b'{"text": "caf\xe9"}\n'), ["l.jsonl.zst:2", "UTF-8"]),
    "binary": ("blob.txt.zst", zst(b"abc\x00\x01\x02"), ["blob.txt.zst", "looks binary"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ZST))
def test_bad_zst_input_is_one_line_naming_file_and_line(case, tmp_path):
    name, content, expected = BAD_ZST[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ScratchLMError) as error:
        list(iter_documents(resolve_sources([str(path)])))
    message = str(error.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message


def test_zst_undecodable_bytes_can_be_replaced(tmp_path):
    path = tmp_path / "latin1.txt.zst"
    path.write_bytes(zst("caf\xe9 au lait\n".encode("latin-1")))
    assert documents([str(path)], errors="replace") == [("caf\ufffd au lait", "latin1.txt.zst", 1)]
