"""Tokenizers trained on the user's corpus, saved as folders that ``transformers`` loads as they are.

A trained folder holds ``tokenizer.json`` (the whole ``tokenizers`` pipeline), ``tokenizer_config.json``
and ``special_tokens_map.json``; ``AutoTokenizer.from_pretrained(folder)`` gives a fast tokenizer with
the same ids as the raw ``tokenizers.Tokenizer``. The special tokens follow the model family's
*style*:

- ``bert``: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` at ids 0..4, and every encoding is wrapped as
  ``[CLS] text [SEP]`` (the [SEP] doubles as the document separator when blocks are packed). With
  sentinels, [SEP] is also the end-of-text token (``eos_token``) that span corruption closes its
  inputs and targets with, so one tokenizer serves MLM, causal LM and T5 arms alike.
- ``gpt``: ``<|endoftext|>`` (end and beginning of text) and a separate ``<|pad|>``, so padding is
  never confused with the end of a document; ``<|unk|>`` only for models that can meet unknown text.
  Nothing is added to an encoding: a prompt given to ``generate()`` must not end with end-of-text.
- ``t5``: ``<pad> </s> <unk>`` at ids 0..2 and no beginning-of-text token, every encoding closed by
  ``</s>`` (as T5's encoder inputs are), and sentinels ``<extra_id_0>``, ``<extra_id_1>``, ... at the
  top of the vocabulary, ``<extra_id_0>`` the highest id (see ``add_sentinels``).
- ``bart``: ``<s> <pad> </s> <unk> <mask>`` at ids 0..4 (RoBERTa's order), and every encoding is
  wrapped as ``<s> text </s>``; ``</s>`` closes each packed document and starts the decoder.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from scratchlm.errors import ScratchLMError
from scratchlm.folders import check_destination, flush_to_disk, replace_folder, staging_folder

Kind = Literal["bpe", "wordpiece", "unigram"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The files of a tokenizer folder, as ``TokenizerInfo.files()`` returns them."""

ROLES = ("pad", "eos", "bos", "mask", "cls", "sep", "unk")
"""Special-token roles; each is saved in ``tokenizer_config.json`` as ``<role>_token``."""

TRAIN_BATCH = 256
"""Documents per list handed to ``train_from_iterator``: batches cut the Python/Rust crossings."""

BYTE_ALPHABET = 256
"""Byte-level BPE starts from one token per byte value."""


# --- styles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """The special tokens of a family of models and how encodings are wrapped in them."""

    tokens: tuple[tuple[str, str], ...]
    """(role, text) pairs; distinct texts get ids 0, 1, ... in this order. A text may fill two roles."""
    unk_needed_by_bpe: bool
    """Keep the unknown token for byte-level BPE, which can spell any text without it."""
    template: bool
    """Wrap every encoding as ``cls $A sep`` (pairs: ``cls $A sep $B sep``)."""
    eos_suffix: bool = False
    """Close every encoding with eos (``$A eos``; pairs ``$A eos $B eos``), as T5's tokenizer does."""
    sentinels: int = 0
    """Sentinel tokens added at the top of the vocabulary when none are asked for (span corruption)."""


STYLES = {
    "bert": Style(
        tokens=(("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]")),
        # BERT tools expect [PAD]=0 ... [MASK]=4 whatever the model, so [UNK] stays for BPE too.
        unk_needed_by_bpe=True,
        template=True,
    ),
    "gpt": Style(
        tokens=(("eos", "<|endoftext|>"), ("bos", "<|endoftext|>"), ("pad", "<|pad|>"), ("unk", "<|unk|>")),
        unk_needed_by_bpe=False,
        template=False,
    ),
    # BART's (RoBERTa's) ids: <s>=0, <pad>=1, </s>=2, <unk>=3, then <mask>; <s> and </s> double as
    # cls and sep, and every encoding is <s> text </s>, as BART's encoder saw it in pre-training.
    "bart": Style(
        tokens=(
            ("bos", "<s>"), ("cls", "<s>"), ("pad", "<pad>"), ("eos", "</s>"), ("sep", "</s>"),
            ("unk", "<unk>"), ("mask", "<mask>"),
        ),
        unk_needed_by_bpe=True,  # BART tools expect <unk> at id 3
        template=True,
    ),
    "t5": Style(
        tokens=(("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>")),
        unk_needed_by_bpe=True,  # T5 tools expect <unk> at id 2
        template=False,
        eos_suffix=True,
        sentinels=100,  # as HF's T5 tokenizers (extra_ids=100)
    ),
}

STYLE_OF_FAMILY = {"bart": "bart", "bert": "bert", "gpt2": "gpt", "llama": "gpt", "modernbert": "bert", "modernbert-causal": "gpt", "t5": "t5"}
"""Which special-token style each model family uses."""

SENTINEL = "<extra_id_{}>"
"""Text of sentinel i, as in HF's T5 tokenizers."""

DEFAULT_KIND_OF_STYLE: dict[str, Kind] = {"bert": "wordpiece", "gpt": "bpe", "bart": "bpe", "t5": "unigram"}
"""The tokenizer model a style gets when none is asked for, as in the original models."""


def style_of_family(family: str) -> Style:
    if family not in STYLE_OF_FAMILY:
        raise ScratchLMError(
            f"family={family!r}: no tokenizer style is known for it; choose one of {sorted(STYLE_OF_FAMILY)}"
        )
    return STYLES[STYLE_OF_FAMILY[family]]


def style_tokens(style: Style, kind: Kind) -> dict[str, str]:
    """role -> token text for one style and kind, in id order."""
    return {
        role: text
        for role, text in style.tokens
        if not (role == "unk" and kind == "bpe" and not style.unk_needed_by_bpe)
    }


def added_tokens(roles: dict[str, str]) -> list[AddedToken]:
    """The distinct special tokens, in id order, as the trainers take them."""
    texts = list(dict.fromkeys(roles.values()))
    # A mask swallows the space before it ("is [MASK] used"), as RoBERTa's does, so the
    # fill-mask input reads the same as the text the model was trained on.
    mask = roles.get("mask")
    return [AddedToken(t, special=True, lstrip=t == mask, normalized=False) for t in texts]


# --- the three tokenizer models -----------------------------------------------------------------


def byte_level_bpe(vocab_size: int, min_frequency: int, specials: list[AddedToken], unk: str | None):
    """GPT-2's byte-level BPE: every byte has a token, so any text round-trips exactly."""
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: "Hello" at the start of a text stays "Hello", and decode(encode(x)) == x.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def wordpiece(vocab_size: int, min_frequency: int, specials: list[AddedToken], unk: str | None):
    """BERT's WordPiece, cased: the BERT normalizer cleans control characters but keeps case."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=unk))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    return tokenizer, trainer


def unigram(vocab_size: int, min_frequency: int, specials: list[AddedToken], unk: str | None):
    """SentencePiece-style Unigram LM over Metaspace pieces ("▁" marks a preceding space).

    ``min_frequency`` does not apply: Unigram prunes by likelihood, not by count."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token=unk, show_progress=False
    )
    return tokenizer, trainer


BUILDERS = {"bpe": byte_level_bpe, "wordpiece": wordpiece, "unigram": unigram}
"""kind -> function(vocab_size, min_frequency, specials, unk) -> (untrained Tokenizer, trainer)."""


# --- training ----------------------------------------------------------------------------------


def train_tokenizer(
    paths: Sequence[str] | None,
    out_dir: str | Path,
    *,
    kind: Kind | None = None,
    vocab_size: int = 8192,
    family: str = "gpt2",
    text_field: str = "text",
    model_max_length: int = 1024,
    min_frequency: int = 2,
    errors: Literal["strict", "replace"] = "strict",
    sentinels: int | None = None,
) -> Path:
    """Train a tokenizer on a corpus, streaming its documents, and write it to ``out_dir``.

    Args:
        paths: Files, folders, globs or ``datasets:NAME`` (see ``data.sources.resolve_sources``);
            None or empty for the built-in corpus.
        out_dir: Folder to write. It is replaced as a whole, atomically (a crash leaves the previous
            one), and only if it is empty or holds nothing but tokenizer files.
        kind: Tokenizer model; None for the family's default (wordpiece for bert, bpe for gpt2).
        vocab_size: Vocabulary size, special tokens included.
        family: Model family whose special tokens to add (see ``STYLE_OF_FAMILY``).
        text_field: Field of JSONL / parquet / datasets records that holds the text.
        model_max_length: Longest input, in tokens, that the saved tokenizer announces.
        min_frequency: Fewest occurrences a merge or word piece needs (bpe, wordpiece).
        errors: What to do with bytes that are not UTF-8: stop (strict) or use U+FFFD (replace).
        sentinels: Sentinel tokens for span corruption, ``<extra_id_0>`` at the highest id
            (counted in ``vocab_size``); None for the style's default (100 for t5, else 0). A
            style without an end-of-text token (bert) then makes its [SEP] one.

    Returns:
        ``out_dir`` as a Path.
    """
    # Imported here, not at the top: data.stream imports this module for TokenizerInfo.
    from scratchlm.data.sources import first_document, resolve_sources

    style = style_of_family(family)
    kind = kind or DEFAULT_KIND_OF_STYLE[STYLE_OF_FAMILY[family]]
    if kind not in BUILDERS:
        raise ScratchLMError(f"kind={kind!r}: unknown tokenizer kind; choose one of {sorted(BUILDERS)}")
    roles = style_tokens(style, kind)
    specials = added_tokens(roles)
    sentinels = style.sentinels if sentinels is None else sentinels
    check_sentinels(sentinels)
    if model_max_length < 1:
        raise ScratchLMError(f"model_max_length={model_max_length}: must be positive (the longest input, in tokens)")
    if sentinels and "eos" not in roles and "sep" in roles:
        roles = {**roles, "eos": roles["sep"]}  # no new token: [SEP] already closes every text
    check_vocab_size(vocab_size, kind, len(specials) + sentinels)
    sources = resolve_sources(paths)
    first_document(sources, text_field=text_field, errors=errors)  # fail before training, not after
    tokenizer, trainer = BUILDERS[kind](vocab_size - sentinels, min_frequency, specials, roles.get("unk"))
    try:
        tokenizer.train_from_iterator(text_batches(sources, text_field, errors), trainer=trainer)
    except Exception as error:
        if "not large enough to contain all chars" not in str(error):
            raise
        raise ScratchLMError(
            f"vocab_size={vocab_size} is too small for a {kind} tokenizer of this corpus: Unigram keeps each "
            f"character of the text as a piece, besides the {len(specials) + sentinels} special tokens; raise "
            "the vocabulary size"
        ) from None
    add_sentinels(tokenizer, sentinels)
    if style.template:
        tokenizer.post_processor = template(tokenizer, roles["cls"], roles["sep"])
    if style.eos_suffix:
        tokenizer.post_processor = eos_template(tokenizer, roles["eos"])
    files = tokenizer_files(tokenizer, roles, model_max_length)
    return replace_dir(files, Path(out_dir))


def check_sentinels(sentinels: int) -> None:
    if isinstance(sentinels, bool) or not isinstance(sentinels, int) or sentinels < 0:
        raise ScratchLMError(f"sentinels={sentinels!r}: must be a whole number, 0 or more (T5 uses 100)")


def add_sentinels(tokenizer: Tokenizer, count: int) -> None:
    """Add ``<extra_id_{count-1}>`` ... ``<extra_id_0>`` after the trained vocabulary, in that
    order, so that ``<extra_id_0>`` has the highest id and sentinel i has id V-1-i, as in HF's T5
    tokenizers (span corruption numbers the masked spans from there, counting down). Each is one
    special token that swallows the space before it, so "a <extra_id_0> b" splits as T5's
    SentencePiece does: "▁a", "<extra_id_0>", "▁b"."""
    tokenizer.add_special_tokens(
        [AddedToken(SENTINEL.format(i), special=True, lstrip=True, normalized=False) for i in reversed(range(count))]
    )


def eos_template(tokenizer: Tokenizer, eos: str) -> processors.TemplateProcessing:
    """T5's wrapping: ``A </s>``, and ``A </s> B </s>`` with B as segment 1."""
    return processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )


def check_vocab_size(vocab_size: int, kind: Kind, n_specials: int) -> None:
    smallest = n_specials + (BYTE_ALPHABET if kind == "bpe" else 1)
    if vocab_size < smallest:
        raise ScratchLMError(
            f"vocab_size={vocab_size} is too small for a {kind} tokenizer with {n_specials} special "
            f"tokens; use at least {smallest}"
        )


def text_batches(sources, text_field: str, errors: str) -> Iterator[list[str]]:
    from scratchlm.data.sources import iter_documents

    batch = []
    for document in iter_documents(sources, text_field=text_field, errors=errors):
        batch.append(document.text)
        if len(batch) == TRAIN_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def template(tokenizer: Tokenizer, cls: str, sep: str) -> processors.TemplateProcessing:
    """BERT's wrapping: ``[CLS] A [SEP]``, and ``[CLS] A [SEP] B [SEP]`` with B as segment 1."""
    ids = [(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))]
    return processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=ids
    )


def tokenizer_files(tokenizer: Tokenizer, roles: dict[str, str], model_max_length: int) -> dict[str, str]:
    """The three files of a tokenizer folder, as text."""
    token_map = {f"{role}_token": text for role, text in roles.items()}
    config = {
        # The generic fast class takes tokenizer.json as it is; a model-specific class (GPT2Tokenizer,
        # BertTokenizer) would rebuild the post-processor and add or drop special tokens.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode must give the text back unchanged
        **token_map,
    }
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(token_map, indent=2, ensure_ascii=False) + "\n",
    }


# --- writing -----------------------------------------------------------------------------------


def write_tokenizer_files(files: dict[str, str], out_dir: str | Path) -> None:
    """Write ``files`` (name -> text, as from ``TokenizerInfo.files()``) into ``out_dir``.

    Each file appears whole or not at all (written beside, then renamed); other files in
    ``out_dir`` are left alone."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"tokenizer file name {name!r} is not a plain file name")
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)


def replace_dir(files: dict[str, str], out_dir: Path) -> Path:
    """Make ``out_dir`` hold exactly ``files``, switching folders by rename so a crash never
    leaves a half-written tokenizer where a good one was."""
    check_destination(out_dir, label="tokenizer output", what="a tokenizer", owned=TOKENIZER_FILES)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out_dir) as staging:
        write_tokenizer_files(files, staging)
        flush_to_disk(staging)
        replace_folder(staging, out_dir)
    return out_dir


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerInfo:
    """What the rest of scratchlm needs to know about a trained tokenizer folder.

    The files are read once, at ``load``: a run keeps the tokenizer it started with, even if
    the folder changes underneath it, and its checkpoints carry that tokenizer."""

    path: str
    """The folder it was loaded from."""
    vocab_size: int
    """Size of the whole vocabulary, added special tokens included: the model's embedding rows."""
    pad_id: int | None
    """Padding token; never a training target."""
    eos_id: int | None
    """End of text: closes every packed document (gpt style)."""
    bos_id: int | None
    """Beginning of text; the same token as ``eos`` in gpt style."""
    mask_id: int | None
    """The token MLM puts in place of hidden ones (bert style)."""
    cls_id: int | None
    """Opens every encoding (bert style)."""
    sep_id: int | None
    """Closes every encoding, and so every packed document (bert style)."""
    unk_id: int | None
    """Stands for text the vocabulary cannot spell; None for byte-level BPE in gpt style."""
    special_ids: tuple[int, ...]
    """Every special token's id, sorted: none of them is ever masked or a prediction target of MLM."""
    model_max_length: int | None
    """Longest input the tokenizer announces, in tokens; None when the folder leaves it unbounded."""
    file_texts: dict[str, str] = field(repr=False, compare=False)
    """File name -> text of the folder's tokenizer files, as read."""

    @classmethod
    def load(cls, path: str | Path) -> "TokenizerInfo":
        """Read a tokenizer folder (as written by ``train_tokenizer``)."""
        folder = Path(path)
        if folder.is_file():
            raise ScratchLMError(f"tokenizer {folder} is a file; pass the folder that holds it ({folder.parent})")
        if not (folder / "tokenizer.json").is_file():
            what = "does not exist" if not folder.exists() else "has no tokenizer.json"
            raise ScratchLMError(
                f"tokenizer {folder} {what}; pass a folder written by scratchlm tokenizer train"
            )
        files = {name: (folder / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
                 if (folder / name).is_file()}
        tokenizer = parse_tokenizer(folder, files["tokenizer.json"])
        config = parse_config(folder, files.get("tokenizer_config.json"))
        ids = {role: role_id(folder, tokenizer, config, role) for role in ROLES}
        specials = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        specials |= {i for i in ids.values() if i is not None}
        return cls(
            path=str(folder),
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
            **{f"{role}_id": ids[role] for role in ROLES},
            special_ids=tuple(sorted(specials)),
            model_max_length=max_length(config),
            file_texts=files,
        )

    def tokenizer(self) -> Tokenizer:
        """A fresh raw ``tokenizers.Tokenizer`` (fast, picklable), as saved: no padding or truncation."""
        tokenizer = Tokenizer.from_str(self.file_texts["tokenizer.json"])
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer

    def files(self) -> dict[str, str]:
        """File name -> text of the tokenizer files, to embed in a checkpoint and write out again
        with ``write_tokenizer_files``."""
        return dict(self.file_texts)


def parse_tokenizer(folder: Path, text: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(text)
    except Exception as error:  # the tokenizers library raises a bare Exception for bad files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ScratchLMError(
            f"tokenizer {folder / 'tokenizer.json'} cannot be read ({reason}); "
            "retrain it with scratchlm tokenizer train"
        ) from None


def parse_config(folder: Path, text: str | None) -> dict:
    where = folder / "tokenizer_config.json"
    if text is None:
        raise ScratchLMError(
            f"tokenizer {folder} has no tokenizer_config.json; retrain it with scratchlm tokenizer train"
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ScratchLMError(
            f"{where}:{error.lineno}: malformed JSON ({error.msg}); fix or retrain the tokenizer"
        ) from None
    if not isinstance(config, dict):
        raise ScratchLMError(f"{where}: is not a JSON object; fix or retrain the tokenizer")
    return config


def role_id(folder: Path, tokenizer: Tokenizer, config: dict, role: str) -> int | None:
    token = config.get(f"{role}_token")
    if isinstance(token, dict):  # transformers may save an AddedToken as {"content": ...}
        token = token.get("content")
    if token is None:
        return None
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ScratchLMError(
            f"{folder / 'tokenizer_config.json'}: {role}_token {token!r} is not in the vocabulary "
            "of tokenizer.json; fix or retrain the tokenizer"
        )
    return token_id


def max_length(config: dict) -> int | None:
    value = config.get("model_max_length")
    # transformers writes int(1e30) for "no limit".
    if not isinstance(value, (int, float)) or value >= 1e12:
        return None
    return int(value)
