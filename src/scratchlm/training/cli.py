"""``scratchlm fit``: Lightning's CLI over :class:`PretrainModule` and :class:`TextDataModule`,
whose signatures give the flags (``--model.*``, ``--data.*``, ``--trainer.*``), with scratchlm's
run layout. ``scratchlm.cli`` imports this module (and so Lightning) only when the command trains.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
import shutil
import sys
import warnings
from typing import Literal

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from scratchlm.cli import note_smaller_vocabulary
from scratchlm.data.module import TextDataModule
from scratchlm.data.prepared import default_tokenizer
from scratchlm.tokenizer import train_tokenizer
from scratchlm.training.callbacks import TokenThroughput
from scratchlm.training.checkpoint import TrainedModel
from scratchlm.training.checkpoint_io import AtomicCheckpointIO, check_checkpoint_file
from scratchlm.training.curves import write_curves
from scratchlm.training.module import PretrainModule
from scratchlm.training.run_dir import claim_run_dir, release_run_dir, run_identity


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
    # Raised by Lightning's own pytree helper against recent PyTorch, twice a run: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
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
