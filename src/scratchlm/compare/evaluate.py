"""Held-out evaluation on one scale for every arm: bits per byte, and each objective's own metrics.

**What is scored.** The first ``eval.documents`` held-out documents, each cut to about
``eval.doc_tokens`` tokens (cut at a token boundary, and the cut text tokenized again, so that the
text scored is exactly the text whose bytes are counted). Each document is tokenized alone, with
its special tokens (``[CLS] text [SEP]``); every token that is not special is scored, once.

**Context.** A document is read in windows of ``data.block_size`` tokens (the training length),
each starting on the previous window's last token: windows overlap by one token, so every position
after the first is scored in exactly one window, the one where it is not the first token. Every
arm scores the same tokens in the same windows:

- causal LM: the next-token log-likelihood of each scored token given the window up to it;
- MLM: the pseudo-log-likelihood (Salazar et al. 2020, "Masked Language Model Scoring"): the
  token is replaced by the mask token and predicted from the rest of its window. Every scored
  token gets its own masked copy of its window; copies are batched, and the head runs only at
  the masked position of each copy.
- span corruption (T5): the same pseudo-log-likelihood, each token a one-token span. Its copy of
  the window has the token replaced by the first sentinel and is closed by end-of-text, as span
  corruption lays out an encoder input; the decoder reads the start token and that sentinel and
  scores the token next, as the target ``<extra_id_0> token </s>`` of such a span has it.

**Bits per byte** = (summed negative log-likelihood in nats) / (ln 2 × UTF-8 bytes of the scored
texts). Note that a pseudo-log-likelihood is no normalised probability of the text: the MLM and
span arms' "bits per byte" are not code lengths, and they flatter those arms (each token sees
both sides); the report says so next to it.

**MLM accuracy** masks ``eval.mask_rate`` (15%) of the non-special tokens of non-overlapping
blocks, with the mask token only (no random or kept tokens), the positions drawn from the tokens
themselves (the same masks for every arm and run), whatever rate the arm trained with.

**Span-corruption loss and accuracy** corrupt the same non-overlapping blocks at the arm's
training noise density and span length, the spans drawn from the tokens themselves, and score
every target token (sentinels and the closing end-of-text included, as the training loss does).
"""

from collections.abc import Iterator
from dataclasses import dataclass
import itertools
import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from scratchlm.compare.config import DataSpec, EvalSpec
from scratchlm.data import resolve_sources
from scratchlm.data.stream import split_documents
from scratchlm.errors import ScratchLMError
from scratchlm.objectives import IGNORE_INDEX, MaskedLM, MaskingConfig, SpanConfig, SpanCorruption
from scratchlm.objectives.batch import content_generator
from scratchlm.tokenizer import TokenizerInfo


@dataclass
class HeldOut:
    """The held-out text every arm is scored on."""

    texts: list[str]
    """Each document exactly as scored (after the cut)."""
    ids: list[list[int]]
    """Its token ids, special tokens included."""
    scored: list[list[bool]]
    """Per token: scored (not a special token)."""
    window: int
    """Window length T."""

    @property
    def n_bytes(self) -> int:
        return sum(len(text.encode("utf-8")) for text in self.texts)

    @property
    def n_tokens(self) -> int:
        return sum(sum(flags) for flags in self.scored)


@dataclass(frozen=True)
class Target:
    """One scored token: which window, and its position in that window."""

    window: int
    position: int


def windows(length: int, size: int) -> list[tuple[int, int]]:
    """[start, end) spans of at most ``size`` tokens covering ``length`` tokens, each starting on
    the previous span's last token: position p >= 1 is a target of exactly one span, the one
    where it is not first."""
    if size < 2:
        raise ScratchLMError(f"data.block_size={size}: the evaluation window needs at least 2 tokens")
    return [(start, min(start + size, length)) for start in range(0, max(length - 1, 1), size - 1)]


def load_held_out(data: DataSpec, info: TokenizerInfo, spec: EvalSpec) -> HeldOut:
    """The first ``spec.documents`` held-out documents, cut to about ``spec.doc_tokens`` tokens."""
    if data.val_paths:
        documents = split_documents(
            resolve_sources(data.val_paths, flag="--data.val_paths"), "all", 0.0,
            text_field=data.text_field, errors=data.errors,
        )
    else:
        documents = split_documents(
            resolve_sources(data.paths), "val", data.val_fraction, text_field=data.text_field, errors=data.errors
        )
    tokenizer = info.tokenizer()
    special = set(info.special_ids)
    texts, ids, scored = [], [], []
    for document in itertools.islice(documents, spec.documents):
        text = cut_to_tokens(document.text, tokenizer, spec.doc_tokens)
        encoding = tokenizer.encode(text, add_special_tokens=True).ids
        texts.append(text)
        ids.append(encoding)
        scored.append([i not in special for i in encoding])
    if not texts:
        raise ScratchLMError(
            "no held-out documents to evaluate on: raise --data.val_fraction or pass --data.val_paths"
        )
    return HeldOut(texts, ids, scored, data.block_size)


def cut_to_tokens(text: str, tokenizer, n_tokens: int) -> str:
    """The start of ``text`` that its first ``n_tokens`` tokens (special tokens aside) span."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    if len(encoding.ids) <= n_tokens:
        return text
    return text[: encoding.offsets[n_tokens - 1][1]]


def window_ids(held_out: HeldOut) -> tuple[list[list[int]], list[Target]]:
    """Every window's token ids, and every scored token as (window, position in it)."""
    spans, targets = [], []
    for ids, scored in zip(held_out.ids, held_out.scored):
        for start, end in windows(len(ids), held_out.window):
            targets += [Target(len(spans), p - start) for p in range(start + 1, end) if scored[p]]
            spans.append(ids[start:end])
    return spans, targets


def padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids right-padded with ``pad_id`` and the (B, T) bool mask of real tokens."""
    T = max(len(row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in rows])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    return ids.to(device), mask.to(device)


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def target_nll(model: nn.Module, hidden_ND: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood (nats) of ``targets_N`` under the head at ``hidden_ND``."""
    logits_NV = model.logits(hidden_ND).float()
    return F.cross_entropy(logits_NV, targets_N, reduction="sum")


@torch.no_grad()
def causal_nll(model: nn.Module, held_out: HeldOut, pad_id: int, batch_size: int) -> float:
    """Summed next-token NLL (nats) of the scored tokens, each given its window up to it."""
    device = next(model.parameters()).device
    spans, targets = window_ids(held_out)
    by_window: dict[int, list[int]] = {}
    for target in targets:
        by_window.setdefault(target.window, []).append(target.position)
    total = 0.0
    for chosen in batched(sorted(by_window), batch_size):
        ids_BT, mask_BT = padded([spans[w] for w in chosen], pad_id, device)
        hidden_BTD = model(ids_BT, mask_BT)
        rows = torch.tensor([b for b, w in enumerate(chosen) for _ in by_window[w]], device=device)
        positions = torch.tensor([p for w in chosen for p in by_window[w]], device=device)
        # The hidden state before a token predicts it.
        total += target_nll(model, hidden_BTD[rows, positions - 1], ids_BT[rows, positions]).item()
    return total


@torch.no_grad()
def pseudo_nll(model: nn.Module, held_out: HeldOut, pad_id: int, mask_id: int, batch_size: int) -> float:
    """Summed pseudo-log-likelihood NLL (nats): each scored token masked in its own copy of its
    window and predicted from the rest; ``batch_size`` copies per forward pass."""
    device = next(model.parameters()).device
    spans, targets = window_ids(held_out)
    total = 0.0
    for chunk in batched(targets, batch_size):
        ids_BT, mask_BT = padded([spans[t.window] for t in chunk], pad_id, device)
        rows = torch.arange(len(chunk), device=device)
        positions = torch.tensor([t.position for t in chunk], device=device)
        originals = ids_BT[rows, positions]
        ids_BT[rows, positions] = mask_id  # one masked token per copy
        hidden_BTD = model(ids_BT, mask_BT)
        total += target_nll(model, hidden_BTD[rows, positions], originals).item()
    return total


@torch.no_grad()
def span_pseudo_nll(model: nn.Module, held_out: HeldOut, objective: SpanCorruption, batch_size: int) -> float:
    """Summed pseudo-log-likelihood NLL (nats) of an encoder-decoder trained with span corruption:
    each scored token replaced in its own copy of its window by ``<extra_id_0>``, the copy closed
    by end-of-text, and the token scored at the decoder's second position (after the start token
    and the sentinel); ``batch_size`` copies per forward pass."""
    device = next(model.parameters()).device
    spans, targets = window_ids(held_out)
    sentinel = int(objective.sentinels[0])
    decoder_ids = torch.tensor([[objective.start_id, sentinel]], device=device)  # (1, 2)
    total = 0.0
    for chunk in batched(targets, batch_size):
        ids_BS, mask_BS = padded([spans[t.window] + [objective.eos_id] for t in chunk], objective.pad_id, device)
        rows = torch.arange(len(chunk), device=device)
        positions = torch.tensor([t.position for t in chunk], device=device)
        originals = ids_BS[rows, positions]
        ids_BS[rows, positions] = sentinel  # one one-token span per copy
        hidden_B2D = model(ids_BS, mask_BS, decoder_ids.expand(len(chunk), -1))
        total += target_nll(model, hidden_B2D[:, 1], originals).item()
    return total


@torch.no_grad()
def span_accuracy(model: nn.Module, held_out: HeldOut, objective: SpanCorruption, batch_size: int) -> tuple[float, float]:
    """(accuracy, loss in nats) over the target tokens of span corruption of non-overlapping
    blocks of the window length, the spans fixed by the blocks' tokens."""
    device = next(model.parameters()).device
    T = held_out.window
    blocks = [padded_block(ids[start : start + T], T, objective.pad_id) for ids in held_out.ids for start in range(0, len(ids), T)]
    correct = loss_sum = count = 0.0
    for chunk in batched(blocks, batch_size):
        batch = {k: v.to(device) for k, v in objective.eval_collate(chunk).items()}
        hidden_BTD = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"])
        chosen = batch["labels"] != IGNORE_INDEX
        logits_NV = model.logits(hidden_BTD[chosen]).float()
        targets_N = batch["labels"][chosen]
        correct += (logits_NV.argmax(-1) == targets_N).sum().item()
        loss_sum += F.cross_entropy(logits_NV, targets_N, reduction="sum").item()
        count += targets_N.numel()
    return correct / max(count, 1), loss_sum / max(count, 1)


def padded_block(ids: list[int], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """A packed block as the objectives take it: ``input_ids`` and ``doc_ids`` (-1 at padding)."""
    block = {"input_ids": np.full(length, pad_id, dtype=np.int64), "doc_ids": np.full(length, -1, dtype=np.int32)}
    block["input_ids"][: len(ids)] = ids
    block["doc_ids"][: len(ids)] = 0
    return block


@torch.no_grad()
def masked_accuracy(model: nn.Module, held_out: HeldOut, info: TokenizerInfo, spec: EvalSpec) -> tuple[float, float]:
    """(accuracy, loss in nats) of predicting ``spec.mask_rate`` of the tokens, masked, from the
    rest of non-overlapping blocks of the window length."""
    device = next(model.parameters()).device
    objective = MaskedLM(info, MaskingConfig(mask_rate=spec.mask_rate, replace_mask=1.0, replace_random=0.0))
    T = held_out.window
    blocks = [ids[start : start + T] for ids in held_out.ids for start in range(0, len(ids), T)]
    correct = loss_sum = count = 0.0
    for chunk in batched(blocks, spec.batch_size):
        ids_BT, mask_BT = padded(chunk, info.pad_id, "cpu")
        batch = objective.corrupt({"input_ids": ids_BT, "attention_mask": mask_BT}, generator=content_generator(ids_BT))
        chosen = batch["labels"] != -100
        hidden_ND = model(batch["input_ids"].to(device), mask_BT.to(device))[chosen.to(device)]
        targets_N = batch["labels"][chosen].to(device)
        logits_NV = model.logits(hidden_ND).float()
        correct += (logits_NV.argmax(-1) == targets_N).sum().item()
        loss_sum += F.cross_entropy(logits_NV, targets_N, reduction="sum").item()
        count += targets_N.numel()
    return correct / max(count, 1), loss_sum / max(count, 1)


def evaluate_arm(model: nn.Module, objective: str, held_out: HeldOut, info: TokenizerInfo, spec: EvalSpec,
                 span: SpanConfig | None = None) -> dict[str, float]:
    """Every held-out metric of one trained model: bits per byte and nats per token for all
    arms, perplexity for causal LM, pseudo-perplexity for MLM and span corruption, MLM
    accuracy/loss for MLM, and span-corruption accuracy/loss (at ``span``, the arm's training
    corruption) for span corruption."""
    if objective not in ("clm", "mlm", "span"):
        raise ScratchLMError(f"no held-out scoring for objective {objective!r}; compare mlm, clm and span arms")
    corruption = SpanCorruption(info, span or SpanConfig()) if objective == "span" else None
    was_training = model.training
    model.eval()
    try:
        if objective == "clm":
            nll = causal_nll(model, held_out, info.pad_id, spec.batch_size)
        elif objective == "mlm":
            nll = pseudo_nll(model, held_out, info.pad_id, info.mask_id, spec.batch_size)
        else:
            nll = span_pseudo_nll(model, held_out, corruption, spec.batch_size)
        per_token = nll / held_out.n_tokens
        metrics = {
            "bits_per_byte": nll / (math.log(2) * held_out.n_bytes),
            "nll_per_token": per_token,
            "eval_tokens": held_out.n_tokens,
            "eval_bytes": held_out.n_bytes,
        }
        if objective == "clm":
            metrics["perplexity"] = math.exp(per_token)
        else:
            metrics["pseudo_perplexity"] = math.exp(per_token)
        if objective == "mlm":
            metrics["mlm_accuracy"], metrics["mlm_loss"] = masked_accuracy(model, held_out, info, spec)
        if objective == "span":
            metrics["span_accuracy"], metrics["span_loss"] = span_accuracy(model, held_out, corruption, spec.batch_size)
        return metrics
    finally:
        model.train(was_training)
