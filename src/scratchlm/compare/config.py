"""What a comparison is made of: the schema of ``scratchlm compare`` and of its recipes.

Each dataclass below is one ``--<group>.*`` part of the command line (``--budget.tokens``,
``--probe.data``, ...) and one top-level key of a ``recipes/compare/*.yaml`` file; the field
docstrings are the help. Everything that decides what the arms see (width, depth, tokenizer, token
stream, budget) is set once here and applies to every arm alike.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

from scratchlm.errors import ScratchLMError
from scratchlm.models import FAMILIES
from scratchlm.objectives import MaskingConfig, SpanConfig
from scratchlm.training import OptimConfig


SCORED_OBJECTIVES = ("mlm", "clm", "span")
"""The objectives ``compare.evaluate`` can put on the bits-per-byte scale."""


@dataclass
class Arm:
    """One contestant: a model family trained with one objective."""

    name: str
    """Its label in the report, plots and output folders (letters, digits, - and _)."""
    family: str
    """Model family (modernbert, modernbert-causal, bert, gpt2, llama, t5)."""
    objective: Literal["mlm", "clm", "span"] | None = None
    """Pre-training objective: mlm (encoders), clm (decoders) or span (T5 span corruption,
    encoder-decoders); the family's default when unset."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Overrides of this arm only, for fields one family has and the other lacks (e.g.
    ``local_window``, ``n_decoder_layers``); width and depth belong in ``model.arch``, shared by
    every arm."""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ScratchLMError(f"arms: name {self.name!r} must be letters, digits, '-' or '_'")
        if self.family not in FAMILIES:
            raise ScratchLMError(f"arms: {self.name}: family {self.family!r} is unknown; choose one of {sorted(FAMILIES)}")
        if self.objective_name not in SCORED_OBJECTIVES:
            raise ScratchLMError(
                f"arms: {self.name}: family {self.family} trains with {self.objective_name}, which the comparison "
                f"cannot score on held-out text; choose a family whose objective is one of {', '.join(SCORED_OBJECTIVES)}"
            )
        if (self.objective_name == "span") != FAMILIES[self.family].encoder_decoder:
            raise ScratchLMError(
                f"arms: {self.name}: objective {self.objective_name} does not fit family {self.family}: span "
                "corruption trains encoder-decoders (t5), mlm encoders and clm decoders"
            )

    @property
    def objective_name(self) -> str:
        return self.objective or FAMILIES[self.family].objective


def default_arms() -> list[Arm]:
    """The fairest pair: one ModernBERT backbone, bidirectional with MLM and causal with causal LM."""
    return [Arm("mlm", "modernbert"), Arm("clm", "modernbert-causal")]


@dataclass
class ModelSpec:
    """The shape and optimisation every arm shares."""

    size: str = "tiny"
    """Preset of each arm's family: tiny, small or base."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Overrides of preset fields for every arm, e.g. ``{n_layers: 2, d_model: 64}``. For an
    encoder-decoder arm ``n_layers`` is its encoder's depth; its decoder's (``n_decoder_layers``)
    goes in the arm's own ``arch``. The tiny presets match as they are: 4 layers of width 128,
    and T5's 2 encoder + 2 decoder layers of width 128."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """MLM masking of the MLM arms during training (evaluation always masks 15%)."""
    span: SpanConfig = field(default_factory=SpanConfig)
    """Span corruption of the span arms, in training and in their own held-out metric."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and learning-rate schedule, the same for every arm."""
    document_masks: bool = False
    """Keep attention inside each packed document (both arms alike)."""


@dataclass
class DataSpec:
    """The corpus and the token stream, identical for every arm (same files, seed, blocks, order)."""

    paths: list[str] | str | None = None
    """Training text: files, folders, globs (as ``scratchlm fit``); unset: the built-in corpus."""
    tokenizer: str | None = None
    """A tokenizer folder with a mask token (BERT-style specials), and sentinels
    ``<extra_id_0..>`` enough for one block's spans when a span arm runs; unset: one is trained
    into ``OUT/tokenizer`` on the corpus, once, and every arm uses it."""
    val_paths: list[str] | str | None = None
    """Separate held-out text; unset: ``val_fraction`` of the documents, chosen by hash."""
    val_fraction: float = 0.05
    """Share of documents held out (curves and final evaluation) when ``val_paths`` is unset."""
    text_field: str = "text"
    """Field of JSONL / parquet records holding the text."""
    block_size: int = 128
    """Tokens per training sequence, and the window of the held-out evaluation."""
    batch_size: int = 16
    """Blocks per optimizer step."""
    num_workers: int = 0
    """DataLoader worker processes (tokenization runs in them)."""
    shuffle_buffer: int = 64
    """Blocks held to shuffle the training stream."""
    errors: Literal["strict", "replace"] = "strict"
    """Bytes that are not UTF-8: stop (strict) or read as U+FFFD (replace)."""


@dataclass
class TokenizerSpec:
    """The tokenizer trained for the comparison when ``data.tokenizer`` is not given."""

    kind: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    """Byte-level BPE by default: it spells every byte, so bits per byte count all of the text."""
    vocab_size: int = 4096
    """Vocabulary size, special tokens included."""


@dataclass
class Budget:
    """How much training each arm gets; give exactly one."""

    tokens: int | None = None
    """Training tokens per arm (rounded up to whole batches)."""
    flops: float | None = None
    """Training FLOPs per arm, counted from each model (see ``compare.arms.flops_per_token``):
    an arm whose step costs less trains on more tokens."""
    minutes: float | None = None
    """Wall-clock training minutes per arm (steps estimated from a short timed run, then capped)."""

    def check(self) -> None:
        given = {name: value for name, value in vars(self).items() if value is not None}
        if len(given) != 1:
            what = "no budget" if not given else f"several budgets ({', '.join(f'budget.{n}' for n in given)})"
            raise ScratchLMError(
                f"{what}: give exactly one of --budget.tokens, --budget.flops or --budget.minutes "
                "(or one budget key in the recipe)"
            )
        (name, value), = given.items()
        if not value > 0:
            raise ScratchLMError(f"--budget.{name}={value}: must be positive")


@dataclass
class TrainSpec:
    """How the arms train (the same for all)."""

    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    precision: str = "32-true"
    """Lightning precision, e.g. bf16-mixed on a GPU."""
    gradient_clip_val: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    curve_points: int = 8
    """Held-out loss evaluations during training, at evenly spaced steps (the curves' points)."""
    val_batches: int = 8
    """Held-out batches per curve point."""
    progress_bar: bool = False
    """Show Lightning's progress bar."""


@dataclass
class EvalSpec:
    """The final held-out evaluation, on the same documents and bytes for every arm."""

    documents: int = 16
    """Held-out documents scored (the first ones of the held-out split, in corpus order)."""
    doc_tokens: int = 128
    """Each document is cut to about this many tokens (at a token boundary, then re-tokenized):
    pseudo-log-likelihood costs one forward pass per token."""
    mask_rate: float = 0.15
    """Masking rate of the MLM accuracy, whatever the training rate."""
    batch_size: int = 64
    """Sequences per forward pass (masked copies, for pseudo-log-likelihood)."""

    def check(self) -> None:
        for name in ("documents", "doc_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ScratchLMError(f"--eval.{name}={getattr(self, name)}: must be 1 or more")
        if not 0 < self.mask_rate < 1:
            raise ScratchLMError(f"--eval.mask_rate={self.mask_rate}: must lie strictly between 0 and 1")


@dataclass
class ProbeSpec:
    """The downstream probe, run from each arm's exported Hugging Face folder."""

    data: str | None = None
    """Labeled JSONL (also .jsonl.gz), one object per line; unset: the built-in set (docstrings of
    Python's standard library labeled by package, see ``compare.probe_data``)."""
    text_field: str = "text"
    """Field holding the text."""
    label_field: str = "label"
    """Field holding the label (a string or an integer)."""
    test_fraction: float = 0.2
    """Share of examples in the test split, chosen by a hash of the text (the same on every run)."""
    max_train: int | None = None
    """Keep at most this many training examples (the lowest hashes: a fixed random subset)."""
    max_test: int | None = None
    """Keep at most this many test examples."""
    max_length: int = 128
    """Tokens per example (longer texts are truncated)."""
    epochs: float = 3.0
    """Fine-tuning passes over the training split."""
    batch_size: int = 32
    """Examples per fine-tuning step."""
    lr: float = 3e-4
    """Peak fine-tuning learning rate (linear warmup over 10% of the steps, then linear decay)."""
    linear_l2: float = 1e-3
    """L2 penalty of the frozen-feature logistic regression."""

    def check(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ScratchLMError(f"--probe.test_fraction={self.test_fraction}: must lie strictly between 0 and 1")
        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ScratchLMError(f"--probe.{name}={getattr(self, name)}: must be 1 or more")
        if not self.epochs > 0 or not self.lr > 0:
            raise ScratchLMError("--probe.epochs and --probe.lr must be positive")


@dataclass
class CompareConfig:
    """Everything ``scratchlm compare`` needs (the parsed command line and recipe)."""

    out: str
    """Folder for the report, metrics, plots, the tokenizer and every arm's exported model."""
    arms: list[Arm] = field(default_factory=default_arms)
    """The contestants, in report order."""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    budget: Budget = field(default_factory=Budget)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    seeds: int = 1
    """Repeats: seed k (0, 1, ...) initialises every arm's weights and orders the shared token
    stream, so each seed is a matched run of every arm; the report gives mean ± std over seeds."""
    overwrite: bool = False
    """Write into a non-empty ``out`` (its previous results are replaced)."""

    def check(self) -> None:
        """Refuse a comparison that cannot run, before anything trains."""
        self.budget.check()
        self.eval.check()
        self.probe.check()
        if self.seeds < 1:
            raise ScratchLMError(f"--seeds={self.seeds}: must be 1 or more")
        if len(self.arms) < 2:
            raise ScratchLMError(f"arms: {len(self.arms)} given; a comparison needs at least two")
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ScratchLMError(f"arms: names must differ, got {names}")
        if self.train.curve_points < 1 or self.train.val_batches < 1:
            raise ScratchLMError("--train.curve_points and --train.val_batches must be 1 or more")
