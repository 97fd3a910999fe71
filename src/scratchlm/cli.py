"""The ``scratchlm`` command: a table of subcommands, each a function of its arguments.

``fit`` is Lightning's CLI over :class:`PretrainModule` and :class:`TextDataModule`
(``training.cli``: flags come from their signatures, ``--model.*``, ``--data.*``,
``--trainer.*``); the others are small argparse programs. Each command imports what it uses when
it runs: Lightning, PyTorch and ``transformers`` take seconds each to import, which ``scratchlm
--help`` and ``scratchlm tokenizer`` need not wait for, nor ``prepare`` and ``export`` for
Lightning. Problems with the user's input end with one line on stderr and exit code 2.
"""

import argparse
from pathlib import Path
import re
import sys

from scratchlm.errors import ScratchLMError

PARITY_TOLERANCE = 1e-4
"""Largest |logit difference| between our model and the exported HF model that ``--verify`` accepts."""


# --- the commands that train ---------------------------------------------------------------------


def fit(argv: list[str]) -> None:
    """pre-train a model: a recipe (--config) and --model.*, --data.*, --trainer.* flags"""
    from scratchlm.training.cli import fit as run_fit

    run_fit(argv)


def compare(argv: list[str]) -> None:
    """pre-train arms (MLM, causal LM, span corruption) at matched compute, report them side by side"""
    from scratchlm.compare import compare as run_compare

    run_compare(argv)


# --- tokenizer train ---------------------------------------------------------------------------


def tokenizer(argv: list[str]) -> None:
    """train a tokenizer on a corpus (BPE, WordPiece, Unigram) that AutoTokenizer loads"""
    parser = argparse.ArgumentParser(prog="scratchlm tokenizer", description="Tokenizers for scratchlm.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a tokenizer on a corpus, streaming it")
    # The data flags also go by fit's names (--data.paths, ...), which the data errors name.
    train.add_argument("--data", "--data.paths", dest="data", nargs="+", default=None,
                       help="files, folders or globs (default: the built-in corpus)")
    train.add_argument("--kind", choices=["bpe", "wordpiece", "unigram"], default=None, help="default: the family's")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--family", default="gpt2", help="whose special tokens to add (bert, gpt2, llama, t5, bart, ...)")
    train.add_argument(
        "--sentinels", type=int, default=None,
        help="span-corruption sentinels <extra_id_0..N-1> at the top of the vocabulary (default: 100 for t5, else 0)",
    )
    train.add_argument("--text-field", "--data.text_field", dest="text_field", default="text",
                       help="field of JSONL/parquet records holding the text")
    train.add_argument("--errors", "--data.errors", dest="errors", choices=["strict", "replace"], default="strict",
                       help="bytes that are not UTF-8: strict stops at the file and line, replace reads them as U+FFFD")
    train.add_argument("--max-length", type=int, default=1024, help="model_max_length saved with the tokenizer")
    train.add_argument("--out", required=True, help="folder to write; loads with AutoTokenizer.from_pretrained")
    args = parser.parse_args(argv)
    from scratchlm.tokenizer import train_tokenizer

    out = train_tokenizer(
        args.data,
        args.out,
        kind=args.kind,
        vocab_size=args.vocab_size,
        family=args.family,
        text_field=args.text_field,
        errors=args.errors,
        model_max_length=args.max_length,
        sentinels=args.sentinels,
    )
    note_smaller_vocabulary(out, args.vocab_size)
    print(Path(out).resolve())


def note_smaller_vocabulary(folder: Path, asked: int) -> None:
    """Say so when the corpus gave fewer tokens than asked (a small corpus runs out of merges or
    pieces before the vocabulary fills); the model's embedding then has as many rows as there are."""
    from scratchlm.tokenizer import TokenizerInfo

    got = TokenizerInfo.load(folder).vocab_size
    if got < asked:
        print(f"[scratchlm] the tokenizer has {got} tokens, fewer than the {asked} asked: the corpus gave no more",
              file=sys.stderr, flush=True)


# --- prepare -----------------------------------------------------------------------------------


def prepare(argv: list[str]) -> None:
    """tokenize a corpus once into a folder that fit reads without tokenizing again"""
    parser = argparse.ArgumentParser(
        prog="scratchlm prepare",
        description="Tokenize a corpus once into a folder that fit reads as --data.paths, without tokenizing again.",
    )
    parser.add_argument("--data", "--data.paths", dest="data", nargs="+", default=None,
                        help="files, folders or globs, as fit's --data.paths (default: the built-in corpus)")
    parser.add_argument("--tokenizer", "--data.tokenizer", dest="tokenizer", required=True,
                        help="tokenizer folder (from scratchlm tokenizer train); fit trains with this one")
    parser.add_argument("--text-field", "--data.text_field", dest="text_field", default="text",
                        help="field of JSONL/parquet records holding the text")
    parser.add_argument("--errors", "--data.errors", dest="errors", choices=["strict", "replace"], default="strict",
                        help="bytes that are not UTF-8: strict stops at the file and line, replace reads them as U+FFFD")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous prepared corpus at --out")
    args = parser.parse_args(argv)
    from scratchlm.data.prepared import prepare_corpus

    metadata = prepare_corpus(
        args.data, args.tokenizer, args.out, text_field=args.text_field, errors=args.errors,
        overwrite=args.overwrite, progress=ProgressLine("prepared"),
    )
    out = Path(args.out).resolve()
    print(f"[scratchlm] {metadata['documents']:,} documents, {metadata['tokens']:,} tokens ({metadata['dtype']}); "
          f"train on them with scratchlm fit ... --data.paths {out}", file=sys.stderr, flush=True)
    print(out)


class ProgressLine:
    """Reports documents, tokens and tokens/s on stderr, at most every ``every`` seconds."""

    def __init__(self, verb: str, every: float = 10.0) -> None:
        self.verb, self.every, self.last = verb, every, 0.0

    def __call__(self, documents: int, tokens: int, seconds: float) -> None:
        if seconds - self.last >= self.every:
            self.last = seconds
            print(f"[scratchlm] {self.verb} {documents:,} documents, {tokens:,} tokens "
                  f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)", file=sys.stderr, flush=True)


# --- export ------------------------------------------------------------------------------------


def export(argv: list[str]) -> None:
    """write a checkpoint as a Hugging Face folder (--verify compares logits with transformers)"""
    parser = argparse.ArgumentParser(
        prog="scratchlm export", description="Export a scratchlm checkpoint to a Hugging Face folder."
    )
    parser.add_argument("checkpoint", help="a .ckpt written by scratchlm fit")
    parser.add_argument("out_dir", help="folder to write")
    parser.add_argument("--verify", action="store_true", help=f"compare logits with transformers; fail above {PARITY_TOLERANCE}")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
    from scratchlm.export import attention_implementations, verify_export
    from scratchlm.training.checkpoint import TrainedModel

    trained = TrainedModel.from_checkpoint(args.checkpoint)
    path = trained.export(args.out_dir, overwrite=args.overwrite)
    if args.verify:
        diff = max(
            verify_export(trained.model, trained.family, path, attn_implementation=impl)
            for impl in attention_implementations(trained.family)
        )
        print(f"max_abs_diff={diff:.3e}")
        if not diff <= PARITY_TOLERANCE:
            raise ScratchLMError(
                f"export {path} does not reproduce the model: max_abs_diff={diff:.3e} > {PARITY_TOLERANCE}"
            )
    print(path.resolve())


COMMANDS = {"fit": fit, "tokenizer": tokenizer, "prepare": prepare, "export": export, "compare": compare}


def user_message(error: ScratchLMError) -> str:
    """The one-line message of a user error, also when a DataLoader worker raised it: PyTorch
    re-raises worker errors with the worker's traceback folded into the message."""
    text = str(error)
    marker = "ScratchLMError: "
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text


def user_error_in(error: BaseException) -> ScratchLMError | None:
    """The user error that ``error`` is or was raised from, if any: jsonargparse wraps the checks
    our configs make while it builds them (``OptimConfig(lr=-1)``) in its own ValueError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ScratchLMError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


UNION_ERROR = re.compile(
    r'Parser key "(?P<key>[^"]+)": Does not validate against any of the Union subtypes '
    r"Subtypes: \[(?P<types>.*?)\] Errors: .* Given value: (?P<value>.*)$"
)


NESTED_VALUE_ERROR = re.compile(
    r'^Parser key "(?P<key>[^"]+)":.* Parser key "(?P<inner>[^"]+)": Expected a (?P<expected>.+?)\. '
    r"Got value: (?P<value>\S+)"
)


def argument_message(error: argparse.ArgumentError, argv: list[str]) -> str:
    """jsonargparse's message on one line: a YAML syntax error names the recipe file, and a value
    that fits none of a setting's types says what the setting takes."""
    text = " ".join(str(error).split())
    if '"<unicode string>"' in text and "--config" in argv[:-1]:
        text = text.replace('"<unicode string>"', argv[argv.index("--config") + 1])
    if match := NESTED_VALUE_ERROR.search(text):  # a bad value inside a settings group (model.optim)
        return f"{match['key']}.{match['inner']}={match['value']!r}: expected {readable_type(match['expected'])}"
    if (match := UNION_ERROR.search(text)) and "typing.Literal[" in match["types"]:  # a choice: list them
        return f"{match['key']}={match['value']!r}: expected {readable_type(match['types'])}"
    return text


def readable_type(spelled: str) -> str:
    """``typing.Literal['a', 'b']`` -> "one of 'a', 'b'"; ``<class 'bool'>`` -> "a bool"."""
    if "typing.Literal[" in spelled:
        choices = re.sub(r"typing\.Literal\[([^\]]*)\]", r"\1", spelled).replace("<class 'NoneType'>", "None")
        return "one of " + re.sub(r"<class '([\w.]+)'>", r"\1", choices)
    return re.sub(r"<class '([\w.]+)'>", r"a \1", spelled)


def usage() -> str:
    """The command's help: each command beside its function's one-line docstring."""
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {function.__doc__.strip()}" for name, function in COMMANDS.items())
    return (f"usage: scratchlm <command> [options]\n\ncommands:\n{commands}\n\n"
            "scratchlm <command> --help lists a command's options; scratchlm --version prints the version")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv and argv[0] == "--version":
        from scratchlm import __version__

        print(f"scratchlm {__version__}")
        return
    if not argv or argv[0] not in COMMANDS:
        unknown = f"scratchlm: error: no command {argv[0]!r}\n" if argv else ""
        print(f"{unknown}{usage()}", file=sys.stderr)
        sys.exit(2)
    try:
        COMMANDS[argv[0]](argv[1:])
    except argparse.ArgumentError as error:  # a flag or recipe key the command does not know
        print(f"scratchlm: error: {argument_message(error, argv)}; scratchlm {argv[0]} --help lists the options",
              file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        user_error = user_error_in(error)
        if user_error is None:
            raise
        print(f"scratchlm: error: {user_message(user_error)}", file=sys.stderr)
        sys.exit(2)
