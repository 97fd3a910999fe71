"""Tokenizers: every kind with every style trains on a corpus, loads in transformers as a fast
tokenizer with the same ids, and describes itself through TokenizerInfo."""

import json
import os
import pickle

import pytest
from transformers import AutoTokenizer

from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import TokenizerInfo, train_tokenizer, write_tokenizer_files

NASTY = [
    "plain words",
    " leading space",
    "trailing space ",
    "two  spaces\tand a tab\t\ttwo tabs",
    "line\nbreaks\n\n\nand\r\nCRLF\r",
    "café naïve façade Ærøskøbing",
    "emoji 🐍🚀 and ZWJ 👩‍💻 and flags 🇫🇷",
    "中文字符 日本語 한국어 العربية עברית",
    "math ∑∫√∞ ≠ ≤ ≥ and combining e\u0301",
    "control \x01\x7f and nbsp\u00a0and zero-width\u200b",
    "",
    "   ",
    "\n",
]

SPECIALS = {
    "bert": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "gpt2": {"eos": "<|endoftext|>", "bos": "<|endoftext|>", "pad": "<|pad|>"},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(family, kind) -> tokenizer folder, trained on the built-in corpus (a few hundred ms each)."""
    root = tmp_path_factory.mktemp("tokenizers")
    cache = {}

    def get(family: str, kind: str):
        if (family, kind) not in cache:
            cache[family, kind] = train_tokenizer(
                None, root / f"{family}-{kind}", kind=kind, family=family, vocab_size=400, model_max_length=77
            )
        return cache[family, kind]

    return get


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_loads_in_transformers_as_fast_with_special_tokens_and_the_same_ids(trained, family, kind):
    folder = trained(family, kind)
    hf = AutoTokenizer.from_pretrained(folder)
    info = TokenizerInfo.load(folder)
    raw = info.tokenizer()

    assert hf.is_fast and hf.model_max_length == 77 and info.model_max_length == 77
    expected = dict(SPECIALS[family], **({"unk": "<|unk|>"} if family == "gpt2" and kind != "bpe" else {}))
    for role in ("pad", "unk", "cls", "sep", "mask", "eos", "bos"):
        assert getattr(hf, f"{role}_token") == expected.get(role), role
        token_id = raw.token_to_id(expected[role]) if role in expected else None
        assert getattr(info, f"{role}_id") == token_id, role
    assert hf.pad_token_id != hf.eos_token_id
    assert info.special_ids == tuple(sorted({raw.token_to_id(t) for t in expected.values()}))
    assert info.vocab_size == len(hf) == raw.get_vocab_size(with_added_tokens=True)
    assert 300 <= info.vocab_size <= 400

    text = "The for statement is used to iterate over the elements of a sequence."
    ids = hf(text)["input_ids"]
    assert ids == raw.encode(text).ids
    if family == "bert":
        assert ids[0] == info.cls_id and ids[-1] == info.sep_id
        assert hf(text, "second")["input_ids"] == raw.encode(text, "second").ids
        assert [info.pad_id, info.unk_id, info.cls_id, info.sep_id, info.mask_id] == [0, 1, 2, 3, 4]
    else:
        # A prompt must not end with end-of-text: nothing is added.
        assert info.eos_id not in ids and info.bos_id not in ids
    assert hf.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_byte_level_bpe_round_trips_any_text_exactly(trained, family):
    folder = trained(family, "bpe")
    raw = TokenizerInfo.load(folder).tokenizer()
    hf = AutoTokenizer.from_pretrained(folder)
    for text in NASTY:
        ids = raw.encode(text).ids
        assert raw.decode(ids, skip_special_tokens=True) == text, repr(text)
        assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text, repr(text)
    assert raw.token_to_id("[UNK]" if family == "bert" else "<|unk|>") == (1 if family == "bert" else None)
    # Special-token strings in the text are read as those tokens (as GPT-2's tokenizer does).
    special = "[SEP]" if family == "bert" else "<|endoftext|>"
    assert raw.token_to_id(special) in raw.encode(f"a{special}b").ids


def test_the_mask_token_takes_the_space_before_it(trained):
    hf = AutoTokenizer.from_pretrained(trained("bert", "bpe"))
    tokens = hf.convert_ids_to_tokens(hf("The [MASK] statement")["input_ids"])
    assert tokens[tokens.index("[MASK]") - 1] != "Ġ"


def test_bert_style_with_sentinels_keeps_its_ids_and_makes_sep_the_end_of_text(trained, tmp_path):
    """One tokenizer for MLM and span corruption: [MASK] stays, sentinels top the vocabulary, and
    [SEP] (which closes every encoding) is the eos that span corruption closes sequences with."""
    plain = TokenizerInfo.load(trained("bert", "bpe"))
    info = TokenizerInfo.load(train_tokenizer(None, tmp_path / "tok", kind="bpe", vocab_size=600, family="bert", sentinels=6))
    assert plain.eos_id is None
    assert (info.pad_id, info.cls_id, info.sep_id, info.mask_id) == (plain.pad_id, plain.cls_id, plain.sep_id, plain.mask_id)
    assert info.eos_id == info.sep_id and info.vocab_size == 600
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hf.eos_token == "[SEP]" and hf.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_5>"]) == [599, 594]
    assert hf("a b")["input_ids"][-1] == hf.eos_token_id == hf.sep_token_id


def test_info_files_round_trip_through_write_tokenizer_files(trained, tmp_path):
    info = TokenizerInfo.load(trained("gpt2", "bpe"))
    files = info.files()
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a folder an export is filling: other files stay
    write_tokenizer_files(files, out)
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", *sorted(files)]
    again = TokenizerInfo.load(out)
    assert (again.vocab_size, again.eos_id, again.pad_id) == (info.vocab_size, info.eos_id, info.pad_id)
    assert AutoTokenizer.from_pretrained(out)("a b")["input_ids"] == info.tokenizer().encode("a b").ids
    assert pickle.loads(pickle.dumps(info.tokenizer())).encode("a b").ids == info.tokenizer().encode("a b").ids
    with pytest.raises(ValueError):
        write_tokenizer_files({"../escape.json": "{}"}, out)


def test_trains_on_a_users_jsonl_field_and_replaces_its_own_folder_atomically(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"sentence number {i} about apples"}) + "\n" for i in range(200)))
    out = tmp_path / "tok"
    train_tokenizer([str(corpus)], out, family="gpt2", vocab_size=300, text_field="body")
    first = (out / "tokenizer.json").read_text()
    train_tokenizer([str(corpus)], out, family="bert", vocab_size=300, text_field="body")
    assert (out / "tokenizer.json").read_text() != first
    assert TokenizerInfo.load(out).mask_id == 4
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "tok"], "no staging folders left behind"
    assert "apples" in TokenizerInfo.load(out).tokenizer().get_vocab()


def test_refuses_to_replace_a_folder_holding_other_files(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    with pytest.raises(ScratchLMError, match=r"precious.*thesis\.txt"):
        train_tokenizer(None, out, vocab_size=300)
    assert (out / "thesis.txt").read_text() == "do not delete"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"family": "t1000"}, "family='t1000'"),
        ({"kind": "sentencepiece"}, "kind='sentencepiece'"),
        ({"vocab_size": 100}, "vocab_size=100"),
        ({"paths": ["missing.txt"]}, "missing.txt"),
    ],
)
def test_bad_arguments_are_named(kwargs, expected, tmp_path):
    kwargs = {"paths": None, **kwargs}
    with pytest.raises(ScratchLMError) as error:
        train_tokenizer(kwargs.pop("paths"), tmp_path / "out", **kwargs)
    assert expected in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_unigram_vocabulary_smaller_than_the_corpus_alphabet_is_named(tmp_path):
    """Unigram keeps every character as a piece: the built-in corpus has more characters than a
    vocabulary of 40 holds. One clear error, no traceback from the tokenizers library."""
    with pytest.raises(ScratchLMError, match=r"vocab_size=40 is too small for a unigram tokenizer of this corpus"):
        train_tokenizer(None, tmp_path / "out", kind="unigram", vocab_size=40, family="t5", sentinels=0)
    assert not (tmp_path / "out").exists()


def test_an_empty_corpus_is_named_before_training(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ScratchLMError, match=r"no documents in .*empty\.txt"):
        train_tokenizer([str(tmp_path / "empty.txt")], tmp_path / "out")


def test_a_missing_or_broken_tokenizer_folder_is_named(trained, tmp_path):
    with pytest.raises(ScratchLMError, match=r"nowhere does not exist"):
        TokenizerInfo.load(tmp_path / "nowhere")
    (tmp_path / "no-json").mkdir()
    with pytest.raises(ScratchLMError, match=r"no-json has no tokenizer\.json"):
        TokenizerInfo.load(tmp_path / "no-json")
    good = TokenizerInfo.load(trained("gpt2", "bpe")).files()
    broken = tmp_path / "broken"
    write_tokenizer_files({**good, "tokenizer.json": "{not json"}, broken)
    with pytest.raises(ScratchLMError, match=r"broken/tokenizer\.json cannot be read"):
        TokenizerInfo.load(broken)
    with pytest.raises(ScratchLMError, match=r"tokenizer\.json is a file; pass the folder that holds it \(.*broken\)"):
        TokenizerInfo.load(broken / "tokenizer.json")
    bad_config = tmp_path / "bad-config"
    write_tokenizer_files({**good, "tokenizer_config.json": "{"}, bad_config)
    with pytest.raises(ScratchLMError, match=r"bad-config/tokenizer_config\.json:1"):
        TokenizerInfo.load(bad_config)
    unknown = tmp_path / "unknown-token"
    write_tokenizer_files({**good, "tokenizer_config.json": json.dumps({"eos_token": "<|nope|>"})}, unknown)
    with pytest.raises(ScratchLMError, match=r"eos_token '<\|nope\|>' is not in the vocabulary"):
        TokenizerInfo.load(unknown)
