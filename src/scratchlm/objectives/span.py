"""T5 span corruption (Raffel et al. 2020, §3.1.4 and §3.3.4), at collate time.

Of a packed block of L tokens, ``round(noise_density · L)`` are hidden in ``round(noise / mean_span_length)``
spans. Both the hidden and the kept tokens are cut into that many non-empty runs at uniformly
random places and laid alternately, kept run first. The encoder reads the kept runs with span i
replaced by sentinel i; the decoder predicts each sentinel followed by the span it stands for:

    block       a b c d e f g h i j
    encoder     a b <X0> e f g <X1> j </s>          (here spans "c d" and "h i")
    target      <X0> c d <X1> h i </s>

Sentinel i is the token ``<extra_id_i>`` of the tokenizer, id V-1-i (``tokenizer.add_sentinels``).
The counts depend on L alone, so every full block gives an encoder input of exactly
S = L - noise + spans + 1 tokens and a target of exactly T = noise + spans + 1 (``span_lengths``):
batches have static shapes and no token is wasted on padding. This is the arithmetic of T5's
``random_spans_noise_mask`` read forward (from the raw length to S and T) rather than backward (from
a wanted S to the raw length to cut, as ``compute_input_and_target_lengths`` does); the block size
plays the raw length. Documents packed into one block are corrupted as one text, as in T5.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.objectives.batch import IGNORE_INDEX, content_generator, sample_generator
from scratchlm.objectives.cross_entropy import vocab_cross_entropy
from scratchlm.tokenizer import SENTINEL


@dataclass
class SpanConfig:
    """How span corruption hides tokens."""

    noise_density: float = 0.15
    """Fraction of each block's tokens hidden from the encoder (T5: 0.15)."""
    mean_span_length: float = 3.0
    """Mean length of a hidden span, in tokens (T5: 3); fewer, longer spans shorten the target."""

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ScratchLMError(f"model.span.noise_density={self.noise_density}: must lie strictly between 0 and 1")
        if not self.mean_span_length >= 1.0:
            raise ScratchLMError(f"model.span.mean_span_length={self.mean_span_length}: must be at least 1")


def noise_counts(length: int, config: SpanConfig) -> tuple[int, int]:
    """(hidden tokens, hidden spans) for ``length`` real tokens.

    At least one token is hidden and one kept (when ``length`` >= 2), and there are no more spans
    than either the hidden or the kept tokens can fill, since every run is non-empty. Both counts
    never decrease as ``length`` grows, so a shorter (padded) block never needs longer sequences.
    """
    if length < 2:
        return 0, 0
    noise = min(max(round(length * config.noise_density), 1), length - 1)
    spans = min(max(round(noise / config.mean_span_length), 1), noise, length - noise)
    return noise, spans


def span_lengths(block_size: int, config: SpanConfig) -> tuple[int, int]:
    """(S, T): encoder and target lengths of a full block of ``block_size`` tokens."""
    noise, spans = noise_counts(block_size, config)
    return block_size - noise + spans + 1, noise + spans + 1


def random_partition(total: int, parts: int, generator: torch.Generator | None) -> np.ndarray:
    """``parts`` positive integers summing to ``total``, every such split equally likely: the
    cut points are ``parts - 1`` distinct positions drawn from 1..total-1."""
    cuts = torch.randperm(total - 1, generator=generator)[: parts - 1].numpy() + 1
    bounds = np.concatenate([[0], np.sort(cuts), [total]])
    return np.diff(bounds)


def span_ids(length: int, config: SpanConfig, generator: torch.Generator | None) -> np.ndarray:
    """(length,) index of the run each token falls in: even runs are kept, odd runs hidden;
    run 2i is kept and run 2i + 1 is hidden span i."""
    noise, spans = noise_counts(length, config)
    if spans == 0:
        return np.zeros(length, dtype=np.int64)
    runs = np.empty(2 * spans, dtype=np.int64)
    runs[0::2] = random_partition(length - noise, spans, generator)
    runs[1::2] = random_partition(noise, spans, generator)
    return np.repeat(np.arange(2 * spans), runs)


def replace_runs(ids: np.ndarray, runs: np.ndarray, parity: int, sentinels: np.ndarray, eos_id: int) -> np.ndarray:
    """``ids`` with every run of the given parity replaced by one sentinel (run r by sentinel
    r // 2), then eos. parity 1 gives the encoder input, parity 0 the target."""
    first = np.ones(len(ids), dtype=np.bool_)
    first[1:] = runs[1:] != runs[:-1]
    replaced = runs % 2 == parity
    out = np.where(replaced & first, sentinels[runs // 2], ids)[~replaced | first]
    return np.append(out, eos_id)


def find_sentinels(tokenizer_info) -> np.ndarray:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... of the tokenizer, checked to count down from
    the top of the vocabulary as HF's T5 tokenizers lay them out."""
    tokenizer = tokenizer_info.tokenizer()
    ids = []
    while (token_id := tokenizer.token_to_id(SENTINEL.format(len(ids)))) is not None:
        ids.append(token_id)
    retrain = "retrain it with scratchlm tokenizer train --family t5 --sentinels 100"
    if not ids:
        raise ScratchLMError(
            f"tokenizer {tokenizer_info.path} has no sentinel tokens ({SENTINEL.format(0)}, ...), "
            f"which span corruption needs; {retrain}"
        )
    expected = list(range(tokenizer_info.vocab_size - 1, tokenizer_info.vocab_size - 1 - len(ids), -1))
    if ids != expected:
        raise ScratchLMError(
            f"tokenizer {tokenizer_info.path}: sentinel {SENTINEL.format(0)} has id {ids[0]}, but T5 expects "
            f"the sentinels at the top of the vocabulary, counting down from {expected[0]}; {retrain}"
        )
    return np.array(ids, dtype=np.int64)


class SpanCorruption:
    """Span corruption at collate time and the decoder's cross-entropy on the targets.

    Batches hold ``input_ids`` (B, S) and ``attention_mask`` (B, S) for the encoder,
    ``decoder_input_ids`` (B, T) (the targets shifted right behind the start token, which for T5
    is the padding token), ``decoder_attention_mask`` (B, T) and ``labels`` (B, T), -100 at
    padding. Only the last, partial block of a finite stream (validation) has padding.
    """

    name = "span"

    def __init__(self, tokenizer_info, config: SpanConfig | None = None) -> None:
        if tokenizer_info.eos_id is None or tokenizer_info.pad_id is None:
            raise ScratchLMError(
                f"tokenizer {tokenizer_info.path} lacks an end-of-text or padding token, which span "
                "corruption needs; train one with scratchlm tokenizer train --family t5"
            )
        self.config = config or SpanConfig()
        self.needs_word_starts = False
        self.eos_id = tokenizer_info.eos_id
        self.pad_id = tokenizer_info.pad_id
        self.start_id = tokenizer_info.pad_id
        """The decoder's first input (T5: pad; HF config decoder_start_token_id)."""
        self.sentinels = find_sentinels(tokenizer_info)

    def sequence_lengths(self, block_size: int) -> tuple[int, int]:
        """(S, T) for blocks of ``block_size`` tokens; refuses a block needing more sentinels
        than the tokenizer has."""
        noise, spans = noise_counts(block_size, self.config)
        if spans > len(self.sentinels):
            raise ScratchLMError(
                f"data.block_size={block_size} makes {spans} masked spans per block, but the tokenizer "
                f"has only {len(self.sentinels)} sentinels; lower data.block_size, raise "
                "model.span.mean_span_length, or retrain the tokenizer with more --sentinels"
            )
        return span_lengths(block_size, self.config)

    def collate(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return self.corrupt(blocks, sample_generator(blocks))

    def eval_collate(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack([block["input_ids"] for block in blocks]))
        return self.corrupt(blocks, content_generator(ids))

    def corrupt(
        self, blocks: Sequence[dict[str, np.ndarray]], generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        S, T = self.sequence_lengths(len(blocks[0]["input_ids"]))
        B = len(blocks)
        input_ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(B, S, dtype=torch.bool)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for row, block in enumerate(blocks):
            ids = block["input_ids"][block["doc_ids"] >= 0]  # padding only ever trails a block
            runs = span_ids(len(ids), self.config, generator)
            encoder = replace_runs(ids, runs, 1, self.sentinels, self.eos_id)
            target = replace_runs(ids, runs, 0, self.sentinels, self.eos_id)
            input_ids[row, : len(encoder)] = torch.from_numpy(encoder)
            attention_mask[row, : len(encoder)] = True
            labels[row, : len(target)] = torch.from_numpy(target)
        decoder_attention_mask = labels != IGNORE_INDEX
        targets = labels.masked_fill(~decoder_attention_mask, self.pad_id)
        decoder_input_ids = torch.cat([torch.full((B, 1), self.start_id), targets[:, :-1]], dim=1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
            "labels": labels,
        }

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        hidden_BTD = model(
            batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"]
        )
        loss, accuracy = vocab_cross_entropy(model, hidden_BTD.flatten(0, 1), batch["labels"].flatten())
        return loss, {"accuracy": accuracy}
