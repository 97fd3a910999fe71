"""The ``scratchlm`` command: a table of subcommands, each a function of its arguments.

``fit`` is Lightning's CLI over :class:`PretrainModule` and :class:`TextDataModule` (flags come
from their signatures: ``--model.*``, ``--data.*``, ``--trainer.*``); the others are small
argparse programs. Problems with the user's input end with one line on stderr and exit code 2.
"""

import argparse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
import re
import shutil
import sys
import warnings
from typing import Literal

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from scratchlm.compare import compare
from scratchlm.data import TextDataModule
from scratchlm.data.prepared import default_tokenizer, prepare_corpus
from scratchlm.errors import ScratchLMError
from scratchlm.export import attention_implementations, verify_export
from scratchlm.tokenizer import TokenizerInfo, train_tokenizer
from scratchlm.training import PretrainModule, TokenThroughput, TrainedModel
from scratchlm.training.checkpoint_io import AtomicCheckpointIO, check_checkpoint_file
from scratchlm.training.curves import write_curves
from scratchlm.training.run_dir import claim_run_dir, release_run_dir, run_identity

PARITY_TOLERANCE = 1e-4
"""Largest |logit difference| between our model and the exported HF model that ``--verify`` accepts."""


# --- fit ---------------------------------------------------------------------------------------


@dataclass
class TokenizerSpec:
    """The tokenizer ``fit`` trains on the corpus when ``--data.tokenizer`` is not given."""

    kind: Literal["bpe", "wordpiece", "unigram"] | None = None
    """Tokenizer model; the family's default (wordpiece for bert, byte-level bpe for gpt2, unigram
    for t5) when unset."""
    vocab_size: int = 8192
    """Vocabulary size, special tokens and sentinels included."""
    sentinels: int | None = None
    """Sentinel tokens <extra_id_0..N-1> at the top of the vocabulary, for span corruption; the
    family's default when unset (100 for t5, none for the others)."""


class FitCLI(LightningCLI):
    """Lightning's CLI with scratchlm's run layout: everything under ``trainer.default_root_dir``
    (tokenizer/, checkpoints/, logs/, hf/), and an export when training ends."""

    new_claim = False
    """Whether this start recorded the run in its directory (see ``released_on_failure``)."""
    new_tokenizer: Path | None = None
    """The tokenizer this start trained into the run directory, if it did."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(TokenizerSpec, "tokenizer")
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        parser.set_defaults(
            {
                "trainer.default_root_dir": "runs/scratchlm",
                "trainer.max_steps": 1000,
                "trainer.val_check_interval": 250,
                "trainer.check_val_every_n_epoch": None,
                "trainer.log_every_n_steps": 10,
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the run's settings as the recipe and flags give them. (Lightning would overwrite
        ``--model.*`` with the hyperparameters stored in ``--ckpt_path``, so a checkpoint of
        another run would silently turn this run into that one; ``PretrainModule`` refuses it
        instead, naming the file.)"""

    def before_instantiate_classes(self) -> None:
        """Claim the run directory for this run (see ``training.run_dir``), then, when no
        tokenizer is given, take a prepared corpus's or train one into the run directory, before
        the modules that need it."""
        config = self.config[self.subcommand]
        root = Path(config.trainer.default_root_dir)
        identity = run_identity(
            {
                "model": config.model.as_dict(),
                "data": config.data.as_dict(),
                "tokenizer": config.tokenizer.as_dict(),
                "seed_everything": config.seed_everything,
            }
        )
        self.new_claim = claim_run_dir(root, identity, resuming=config.ckpt_path is not None)
        if config.data.tokenizer is None:
            with self.released_on_failure():
                # A prepared corpus brings the tokenizer its ids belong to.
                config.data.tokenizer = default_tokenizer(config.data.paths)
        if config.data.tokenizer is not None:
            config.model.tokenizer = config.data.tokenizer
            return
        out = root / "tokenizer"
        if not (out / "tokenizer.json").is_file():
            spec = config.tokenizer
            with self.released_on_failure():
                train_tokenizer(
                    config.data.paths,
                    out,
                    kind=spec.kind,
                    vocab_size=spec.vocab_size,
                    family=config.model.family,
                    sentinels=spec.sentinels,
                    text_field=config.data.text_field,
                    errors=config.data.errors,
                )
            self.new_tokenizer = out
            note_smaller_vocabulary(out, spec.vocab_size)
        config.data.tokenizer = config.model.tokenizer = str(out)

    def instantiate_classes(self) -> None:
        with self.released_on_failure():
            super().instantiate_classes()

    @contextmanager
    def released_on_failure(self):
        """A start that fails before its first checkpoint (a bad setting, a missing file, a bad
        line found while the data is set up) takes back what it wrote into the run directory: its
        record of the run and a tokenizer it trained there (for settings that never trained to a
        checkpoint). The corrected start, whatever it changed, then finds the folder free; its
        logs stay."""
        try:
            yield
        except BaseException:
            root = Path(self.config[self.subcommand].trainer.default_root_dir)
            if self.new_claim and not any((root / "checkpoints").glob("*.ckpt")):
                if self.new_tokenizer is not None:
                    shutil.rmtree(self.new_tokenizer, ignore_errors=True)
                release_run_dir(root)
            raise

    def fit(self, **kwargs) -> None:
        """``trainer.fit`` (LightningCLI runs a method of the subcommand's name in its place).
        ``--ckpt_path last`` before the run's first checkpoint starts at step 0, saying so. The
        run's curves are drawn however training ends: a run stopped by bad steps or by Ctrl-C is
        the one most worth looking at."""
        if kwargs.get("ckpt_path") == "last" and self.last_checkpoint() is None:
            print(f"[scratchlm] no checkpoint in {Path(self.trainer.default_root_dir) / 'checkpoints'} yet: "
                  "training starts at step 0", file=sys.stderr, flush=True)
            kwargs["ckpt_path"] = None
        try:
            with self.released_on_failure():
                self.trainer.fit(**kwargs)
        finally:
            curves = write_curves(Path(self.trainer.default_root_dir)) if self.trainer.is_global_zero else None
            if curves is not None:
                print(f"[scratchlm] curves: {curves}", file=sys.stderr, flush=True)

    def last_checkpoint(self) -> Path | None:
        path = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        return path if path.exists() else None

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand]["trainer"]
        root = Path(config["default_root_dir"])
        if config.get("logger") in (None, True):
            csv = CSVLogger(root, name="logs")  # one version folder for both: metrics.csv beside the events
            kwargs["logger"] = [csv, TensorBoardLogger(root, name="logs", version=csv.version)]
        every = config.get("val_check_interval") if isinstance(config.get("val_check_interval"), int) else None
        given = config.get("callbacks") or []
        kwargs["callbacks"] = [
            *given,
            TokenThroughput(),
            ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=every),
        ]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            # Each refresh reads the bar's metrics (the loss) back from the device, a synchronisation
            # on a GPU: refresh as often as the loggers write, not every step (Lightning's default).
            kwargs["callbacks"].append(TQDMProgressBar(refresh_rate=config.get("log_every_n_steps") or 1))
        if config.get("plugins") is None:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Refuse a ``--ckpt_path`` that cannot be resumed from before the trainer writes anything
        (its logs included)."""
        path = self.config[self.subcommand].ckpt_path
        if path == "last":
            path = self.last_checkpoint()  # None before the first: ``fit`` starts afresh
        if path is not None and path not in ("hpc", "best", "registry"):
            with self.released_on_failure():
                check_checkpoint_file(Path(path))

    def after_fit(self) -> None:
        """Export the final weights to ``<run dir>/hf`` and print that path as the last line."""
        if not self.trainer.is_global_zero or self.trainer.interrupted:
            return
        out = Path(self.trainer.default_root_dir) / "hf"
        path = TrainedModel.from_module(self.model).export(out, overwrite=True)
        print(path.resolve(), flush=True)


def fit(argv: list[str]) -> None:
    # We pass ``args`` on purpose (the subcommand table consumed argv[0]) and keep sys.argv intact:
    # Lightning's DDP launcher re-runs it for the other ranks.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # The run directory's guard (training.run_dir) already refuses a start that would overwrite
    # another run's checkpoints; a resumed run's own checkpoints are meant to be there.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    FitCLI(
        PretrainModule,
        TextDataModule,
        args=["fit", *argv],
        seed_everything_default=0,
        auto_configure_optimizers=False,  # the module's own AdamW groups and schedules
        save_config_kwargs={"overwrite": True},
        # Errors in flags or recipes come back as ArgumentError, for ``main`` to print in one line
        # (rather than after jsonargparse's seventy-line usage).
        parser_kwargs={"prog": "scratchlm", "exit_on_error": False},
    )


# --- tokenizer train ---------------------------------------------------------------------------


def tokenizer(argv: list[str]) -> None:
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
    got = TokenizerInfo.load(folder).vocab_size
    if got < asked:
        print(f"[scratchlm] the tokenizer has {got} tokens, fewer than the {asked} asked: the corpus gave no more",
              file=sys.stderr, flush=True)


# --- prepare -----------------------------------------------------------------------------------


def prepare(argv: list[str]) -> None:
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
    parser = argparse.ArgumentParser(
        prog="scratchlm export", description="Export a scratchlm checkpoint to a Hugging Face folder."
    )
    parser.add_argument("checkpoint", help="a .ckpt written by scratchlm fit")
    parser.add_argument("out_dir", help="folder to write")
    parser.add_argument("--verify", action="store_true", help=f"compare logits with transformers; fail above {PARITY_TOLERANCE}")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: scratchlm {{{names}}} ...  (scratchlm <command> --help for each)", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
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
