"""BART's denoising objective: text infilling and sentence permutation (Lewis et al. 2020, §2.2, §5.1).

The encoder reads a corrupted block and the decoder writes the original one back, token by token.
Corruption runs at collate time, per block, in two steps:

1. **Sentence permutation** (optional): within each packed document, its sentences are put in a
   random order. A sentence ends after a token whose text ends in ``.``, ``!`` or ``?`` (trailing
   whitespace ignored: byte-level BPE merges ``".\\n"`` into one piece), or where the document's
   ordinary text ends. Special tokens (``<s>``, ``</s>``) stay where they are. The rule reads each
   token's decoded text, so it holds for byte-level BPE, WordPiece and Unigram alike; an
   abbreviation such as "e.g." ends a sentence too, as any rule by punctuation does.
2. **Text infilling**: span lengths are drawn from Poisson(``mean_span``) until they cover
   ``mask_ratio`` of the block's ordinary tokens (the last span is cut to hit the count exactly),
   and each span is replaced by a single mask token, so the model must also infer how many tokens
   are missing. Spans are laid out without overlap and never touch each other, so every span
   leaves exactly one mask, with one exception: spans never cover special tokens, and a span that
   reaches across one (a document boundary) leaves a mask on each side of it. A span of length 0
   inserts a mask where nothing is missing, as in the paper; insertions are kept only while the
   corrupted text stays no longer than the original (each longer span frees room), so the
   corrupted text always fits the block.

The batch has fixed shapes: encoder inputs are the corrupted text right-padded to the block length
S, decoder targets (``labels``) are the original block (T = S), and ``decoder_input_ids`` are the
targets shifted right behind the decoder start token, which for BART is end-of-text (HF's
``shift_tokens_right`` with ``decoder_start_token_id = eos``).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.objectives.batch import IGNORE_INDEX, content_generator, sample_generator
from scratchlm.objectives.cross_entropy import vocab_cross_entropy

SENTENCE_END = (".", "!", "?")
"""A token whose decoded text ends (before trailing whitespace) in one of these ends a sentence."""


@dataclass
class InfillConfig:
    """How BART corrupts a block."""

    mask_ratio: float = 0.3
    """Fraction of each block's ordinary (non-special, non-padding) tokens covered by masked
    spans; 30% as in BART (Lewis et al. 2020, §5.1)."""
    mean_span: float = 3.5
    """λ of the Poisson distribution the span lengths are drawn from; 3.5 as in BART."""
    permute_sentences: bool = True
    """Shuffle the sentences of each document before infilling, as BART-large was trained."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ScratchLMError(f"model.infill.mask_ratio={self.mask_ratio}: must lie strictly between 0 and 1")
        if not self.mean_span > 0.0:
            raise ScratchLMError(f"model.infill.mean_span={self.mean_span}: must be positive")


class TextInfilling:
    """BART's corruption at collate time and the decoder's loss on every real target token."""

    name = "infill"
    needs_word_starts = False

    def __init__(self, tokenizer_info, config: InfillConfig | None = None) -> None:
        for role in ("mask", "eos", "pad"):
            if getattr(tokenizer_info, f"{role}_id") is None:
                raise ScratchLMError(
                    f"tokenizer {tokenizer_info.path} has no {role} token, which infilling needs; "
                    "train one for bart (scratchlm tokenizer train --family bart ...)"
                )
        self.config = config or InfillConfig()
        self.mask_id = tokenizer_info.mask_id
        self.pad_id = tokenizer_info.pad_id
        self.decoder_start_id = tokenizer_info.eos_id
        """The decoder's first input: BART starts from end-of-text."""
        self.special_ids = np.array(sorted(tokenizer_info.special_ids), dtype=np.int64)
        self.sentence_end_ids = sentence_end_ids(tokenizer_info) if self.config.permute_sentences else None

    # --- collate -------------------------------------------------------------------------------

    def collate(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return self.corrupt(blocks, numpy_generator(sample_generator(blocks)))

    def eval_collate(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack([b["input_ids"] for b in blocks]))
        return self.corrupt(blocks, numpy_generator(content_generator(ids)))

    def corrupt(self, blocks: Sequence[dict[str, np.ndarray]], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The encoder-decoder batch of ``blocks``, all (B, L) with L the block length."""
        original = np.stack([b["input_ids"] for b in blocks]).astype(np.int64)  # (B, L)
        real = np.stack([b["doc_ids"] for b in blocks]) >= 0  # (B, L)
        B, L = original.shape
        input_ids = np.full((B, L), self.pad_id, dtype=np.int64)
        lengths = np.zeros(B, dtype=np.int64)
        for row in range(B):
            text, docs = original[row][real[row]], blocks[row]["doc_ids"][real[row]]
            if self.config.permute_sentences:
                text = self.permute_sentences(text, docs, rng)
            corrupted = self.infill(text, rng)
            input_ids[row, : len(corrupted)] = corrupted
            lengths[row] = len(corrupted)
        labels = np.where(real, original, IGNORE_INDEX)
        decoder_input_ids = np.empty_like(labels)
        decoder_input_ids[:, 0] = self.decoder_start_id
        decoder_input_ids[:, 1:] = np.where(real[:, :-1], original[:, :-1], self.pad_id)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(np.arange(L)[None, :] < lengths[:, None]),
            "decoder_input_ids": torch.from_numpy(decoder_input_ids),
            # Target t is real only if every decoder input up to t is, so this masks no input a
            # scored position could see: padding comes only at the end of a block.
            "decoder_attention_mask": torch.from_numpy(real),
            "labels": torch.from_numpy(labels),
        }

    def permute_sentences(self, text: np.ndarray, docs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``text`` with the sentences of each run of ordinary tokens of one document shuffled."""
        ordinary = ~np.isin(text, self.special_ids)
        starts = ordinary.copy()
        starts[1:] &= ~ordinary[:-1] | (docs[1:] != docs[:-1])  # where a run of one document's text begins
        continues = np.zeros_like(ordinary)
        continues[:-1] = ordinary[1:] & ~starts[1:]  # the next token belongs to the same run
        out = text.copy()
        for start, stop in zip(np.flatnonzero(starts), np.flatnonzero(ordinary & ~continues) + 1):
            run = text[start:stop]
            ends = np.flatnonzero(np.isin(run, self.sentence_end_ids)) + 1  # a sentence ends after its end token
            sentences = np.split(run, ends[ends < len(run)])
            out[start:stop] = np.concatenate([sentences[i] for i in rng.permutation(len(sentences))])
        return out

    def infill(self, text: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``text`` (n,) with masked spans, each replaced by one mask token; length <= n."""
        where = np.flatnonzero(~np.isin(text, self.special_ids))  # positions of the ordinary tokens
        n = len(where)
        to_mask = round(self.config.mask_ratio * n)
        if to_mask == 0:
            return text
        spans = span_lengths(to_mask, self.config.mean_span, rng)
        gaps = n - to_mask + 1  # places a span can go: before each of the n - to_mask kept tokens, or last
        spans = rng.permutation(fit_spans(spans, gaps))  # random order: the cut last span goes anywhere
        span_at_gap = np.full(gaps, -1, dtype=np.int64)  # -1: no span in that gap
        span_at_gap[np.sort(rng.choice(gaps, size=len(spans), replace=False))] = spans

        # Ordinary tokens in order, each gap's span then one kept token: kept token j sits at
        # (tokens of spans in gaps 0..j) + j.
        covered = np.maximum(span_at_gap, 0)
        kept_at = np.cumsum(covered)[:-1] + np.arange(gaps - 1)
        masked_ordinary = np.ones(n, dtype=bool)
        masked_ordinary[kept_at] = False
        masked = np.zeros(len(text), dtype=bool)
        masked[where[masked_ordinary]] = True

        # Zero-length spans insert a mask before the kept token of their gap (after the last
        # ordinary token for the final gap).
        insert_at = np.append(where[kept_at], where[-1] + 1)[span_at_gap == 0]
        run_starts = masked & ~np.concatenate([[False], masked[:-1]])
        room = int(masked.sum() - run_starts.sum())  # tokens the spans saved beyond their masks
        insert_at = rng.permutation(insert_at)[:room]

        emitted = np.where(masked, self.mask_id, text)
        keep = ~masked | run_starts
        inserts = np.zeros(len(text) + 1, dtype=bool)
        inserts[insert_at] = True
        # Slot 2i: an inserted mask before position i; slot 2i + 1: position i itself.
        slot_ids = np.stack([np.full(len(text) + 1, self.mask_id), np.append(emitted, 0)], axis=1).ravel()
        slot_used = np.stack([inserts, np.append(keep, False)], axis=1).ravel()
        return slot_ids[slot_used]

    # --- loss ----------------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        hidden_BTD = model(
            batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"]
        )
        loss, accuracy = vocab_cross_entropy(model, hidden_BTD.flatten(0, 1), batch["labels"].flatten())
        return loss, {"accuracy": accuracy}


# --- helpers -------------------------------------------------------------------------------------


def span_lengths(total: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(``mean``) span lengths, drawn until they sum to at least ``total``, the last one
    cut so that they sum to exactly ``total``. Zero lengths are kept (they become insertions)."""
    draws = []
    drawn = 0
    while drawn < total:
        more = rng.poisson(mean, size=int(2 * (total - drawn) / mean) + 4)
        draws.append(more)
        drawn += int(more.sum())
    lengths = np.concatenate(draws)
    cumulative = np.cumsum(lengths)
    last = int(np.searchsorted(cumulative, total))  # the first span that reaches the total
    lengths = lengths[: last + 1]
    lengths[last] = total - (cumulative[last - 1] if last > 0 else 0)
    return lengths


def fit_spans(spans: np.ndarray, gaps: int) -> np.ndarray:
    """At most ``gaps`` spans with the same total: zero-length spans go first, then the last
    spans are merged. Needed only when a block has very few ordinary tokens or ``mask_ratio`` is
    high; at 30% a block of n tokens has about 0.1·n spans and 0.7·n gaps."""
    if len(spans) <= gaps:
        return spans
    spans = np.concatenate([spans[spans > 0], spans[spans == 0]])[: max(gaps, int((spans > 0).sum()))]
    if len(spans) > gaps:
        spans = np.append(spans[: gaps - 1], spans[gaps - 1 :].sum())
    return spans


def sentence_end_ids(tokenizer_info) -> np.ndarray:
    """Ids of the ordinary tokens whose decoded text ends in ``SENTENCE_END`` (ignoring trailing
    whitespace), sorted."""
    tokenizer = tokenizer_info.tokenizer()
    special = set(tokenizer_info.special_ids)
    ids = [i for i in range(tokenizer_info.vocab_size) if i not in special]
    texts = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
    return np.array([i for i, text in zip(ids, texts) if text.rstrip().endswith(SENTENCE_END)], dtype=np.int64)


def numpy_generator(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy generator seeded from ``generator`` (torch's global one when None), so that the
    batch's randomness follows the seeding of ``objectives.batch``."""
    seed = torch.randint(2**62, (), generator=generator).item()
    return np.random.default_rng(seed)
