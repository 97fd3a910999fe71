"""``scratchlm prepare``: a corpus tokenized once streams exactly as its files do, replaces nothing
but a previous prepared corpus, and is refused where its ids or its missing text would mislead."""

import gzip
import json

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.data import TextDataModule, prepared
from scratchlm.data.sources import resolve_sources
from scratchlm.data.stream import PackedBlocks
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import TokenizerInfo, train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(files, tokenizer): the built-in corpus's topics spread over three files of three kinds."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("prepare")
    texts = [topics[name] for name in sorted(topics)]
    files = [root / "a.jsonl", root / "b.txt", root / "c.jsonl.gz"]
    files[0].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:30]), encoding="utf-8")
    files[1].write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts[30:50]), encoding="utf-8")
    with gzip.open(files[2], "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[50:])
    tokenizer = train_tokenizer([str(f) for f in files], root / "tokenizer", kind="bpe", family="bert", vocab_size=600)
    return [str(f) for f in files], str(tokenizer)


def blocks(paths, tokenizer, **options) -> list[dict[str, np.ndarray]]:
    return list(PackedBlocks(resolve_sources(paths), tokenizer, 48, **options))


def assert_same_blocks(got, expected) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


STREAMS = {
    "train, shuffled, two epochs, word starts": dict(split="train", epochs=2, word_starts=True, seed=3),
    "held out": dict(split="val", epochs=1, val_fraction=0.2),
    "one shard of three": dict(split="train", epochs=1, rank=1, world_size=3, shuffle_buffer=0),
}


@pytest.mark.parametrize("options", STREAMS.values(), ids=STREAMS.keys())
def test_a_prepared_corpus_streams_the_blocks_its_files_do(corpus, tmp_path, options):
    files, tokenizer = corpus
    prepared.prepare_corpus(files, tokenizer, tmp_path / "prepared")
    assert_same_blocks(blocks([str(tmp_path / "prepared")], tokenizer, **options), blocks(files, tokenizer, **options))


def test_ids_beyond_uint16_read_back_the_same(corpus, tmp_path, monkeypatch):
    files, tokenizer = corpus
    monkeypatch.setattr(prepared, "token_dtype", lambda vocab_size: "uint32")
    metadata = prepared.prepare_corpus(files, tokenizer, tmp_path / "prepared")
    assert metadata["dtype"] == "uint32"
    assert (tmp_path / "prepared" / "tokens.bin").stat().st_size == 4 * metadata["tokens"]
    options = STREAMS["train, shuffled, two epochs, word starts"]
    assert_same_blocks(blocks([str(tmp_path / "prepared")], tokenizer, **options), blocks(files, tokenizer, **options))


def test_a_prepared_corpus_and_more_files_stream_as_all_the_files(corpus, tmp_path):
    files, tokenizer = corpus
    prepared.prepare_corpus(files[:2], tokenizer, tmp_path / "prepared")
    options = dict(split="train", epochs=2, seed=1)
    assert_same_blocks(
        blocks([str(tmp_path / "prepared"), files[2]], tokenizer, **options), blocks(files, tokenizer, **options)
    )


def test_prepare_replaces_only_a_prepared_corpus_and_only_when_it_completes(corpus, tmp_path):
    files, tokenizer = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ScratchLMError, match=r"holds files that are not a prepared corpus's \(notes\.txt\)"):
        prepared.prepare_corpus(files, tokenizer, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"

    out = tmp_path / "prepared"
    first = prepared.prepare_corpus(files[:1], tokenizer, out)
    with pytest.raises(ScratchLMError, match="--overwrite"):
        prepared.prepare_corpus(files, tokenizer, out)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ScratchLMError, match="broken.jsonl:2"):
        prepared.prepare_corpus([files[0], str(broken)], tokenizer, out, overwrite=True)
    assert json.loads((out / "prepared.json").read_text()) == first, "the failed run replaced the good folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "out", "prepared"], "staging left behind"

    second = prepared.prepare_corpus(files, tokenizer, out, overwrite=True)
    assert second["documents"] > first["documents"]
    assert [part["source"] for part in second["sources"]] == files


def test_a_damaged_prepared_folder_is_named(corpus, tmp_path):
    files, tokenizer = corpus
    good = tmp_path / "prepared"
    prepared.prepare_corpus(files[:1], tokenizer, good)
    tokens = good / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:100])
    with pytest.raises(ScratchLMError, match=r"tokens\.bin has 100 bytes.*prepare it again"):
        resolve_sources([str(good)])
    (good / "prepared.json").write_text('{"format": "scratchlm-prep')
    with pytest.raises(ScratchLMError, match=r"prepared\.json cannot be read"):
        resolve_sources([str(good)])
    (good / "prepared.json").write_text(json.dumps({"format": prepared.FORMAT, "version": 99}))
    with pytest.raises(ScratchLMError, match="version 99"):
        resolve_sources([str(good)])


def test_what_reads_text_refuses_a_prepared_corpus(corpus, tmp_path):
    files, tokenizer = corpus
    prepared.prepare_corpus(files[:1], tokenizer, tmp_path / "prepared")
    with pytest.raises(ScratchLMError, match=r"prepared corpus \(token ids\), and this step reads text"):
        train_tokenizer([str(tmp_path / "prepared")], tmp_path / "tok", vocab_size=500)
    assert not (tmp_path / "tok").exists()


def test_training_with_another_tokenizer_than_the_prepared_one_is_refused(corpus, tmp_path):
    files, tokenizer = corpus
    prepared.prepare_corpus(files[:1], tokenizer, tmp_path / "prepared")
    other = train_tokenizer(files[:1], tmp_path / "other", kind="bpe", family="bert", vocab_size=500)
    data = TextDataModule(paths=[str(tmp_path / "prepared")], tokenizer=str(other))
    with pytest.raises(ScratchLMError, match="prepared with another tokenizer than .*other.*--data.tokenizer .*prepared/tokenizer"):
        data.setup()
    TextDataModule(paths=[str(tmp_path / "prepared")], tokenizer=str(tmp_path / "prepared" / "tokenizer")).setup()


def test_fit_trains_on_a_prepared_corpus_with_its_tokenizer(corpus, tmp_path, capsys):
    files, tokenizer = corpus
    main(["prepare", "--data", *files, "--tokenizer", tokenizer, "--out", str(tmp_path / "prepared")])
    printed = capsys.readouterr()
    assert printed.out.strip() == str((tmp_path / "prepared").resolve())
    assert "documents" in printed.err and "tokens" in printed.err
    main([
        "fit", "--model.family", "bert", "--model.size", "tiny", "--data.paths", str(tmp_path / "prepared"),
        "--data.block_size", "32", "--data.batch_size", "4", "--trainer.max_steps", "3",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
    ])
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    assert folder == str((tmp_path / "run" / "hf").resolve())
    assert not (tmp_path / "run" / "tokenizer").exists(), "fit trained a tokenizer of its own"
    exported = json.loads((tmp_path / "run" / "hf" / "tokenizer.json").read_text())
    assert exported == json.loads(TokenizerInfo.load(tokenizer).files()["tokenizer.json"])


def test_a_file_is_never_read_twice_and_a_prepared_folder_stays_out_of_its_corpus(corpus, tmp_path):
    """A prepared folder beside the files it was made from, or two made from one file, would
    train on each document twice: refused, naming the file. The output folder of prepare may
    not lie inside a corpus folder, where the next reading of that folder would take it in."""
    files, tokenizer = corpus
    prepared.prepare_corpus(files[:2], tokenizer, tmp_path / "prepared")
    prepared.prepare_corpus(files[1:], tokenizer, tmp_path / "more")
    for paths in ([str(tmp_path / "prepared"), files[0]], [str(tmp_path / "prepared"), str(tmp_path / "more")]):
        data = TextDataModule(paths=paths, tokenizer=tokenizer)
        with pytest.raises(ScratchLMError, match=r"would be read twice, .* pass only one of them"):
            data.setup()
    TextDataModule(paths=[str(tmp_path / "prepared"), files[2]], tokenizer=tokenizer).setup()  # disjoint: fine

    corpus_folder = tmp_path / "corpus"
    corpus_folder.mkdir()
    (corpus_folder / "a.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    with pytest.raises(ScratchLMError, match="lies inside the corpus folder"):
        prepared.prepare_corpus([str(corpus_folder)], tokenizer, corpus_folder / "prepared")
    assert [p.name for p in corpus_folder.iterdir()] == ["a.jsonl"]
