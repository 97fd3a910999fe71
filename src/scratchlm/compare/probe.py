"""The downstream probe, from an exported Hugging Face folder, as anyone downstream would load it.

Two probes per folder, both scored by accuracy and macro-F1 on the test split:

- **fine-tune**: ``AutoModelForSequenceClassification`` (a fresh classifier on the pre-trained
  body), every weight trained for ``probe.epochs`` with AdamW. Each class pools as it does in
  ``transformers``: BERT its [CLS] pooler, ModernBERT the mean of its tokens (the export's
  ``classifier_pooling``), causal models (GPT-2, ModernBERT decoder) the last token that is not
  padding, which needs ``pad_token_id`` in the config (the export writes it), and T5 the
  decoder's state at the last end-of-text token of the input, which its decoder reads shifted
  right (every example must hold one: the shared tokenizer closes each with [SEP], its eos).
- **linear**: the body frozen (``AutoModel``; of an encoder-decoder, its encoder), its last
  hidden states averaged over the real (non-padding) tokens, standardised, and a multinomial
  logistic regression with an L2 penalty fitted to them by full-batch L-BFGS: deterministic, and
  a measure of what pre-training alone put into the features.
"""

import math

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from scratchlm.compare.config import ProbeSpec
from scratchlm.compare.probe_data import ProbeSet
from scratchlm.errors import ScratchLMError
from scratchlm.export.hf import quiet_transformers

LINEAR_ITERATIONS = 200
"""L-BFGS iterations of the logistic regression (it converges in far fewer on these sizes)."""

FEATURE_BATCH = 64
"""Examples per forward pass when extracting frozen features."""


class Encoded:
    """Token ids of a list of texts, truncated; batches are right-padded on demand."""

    def __init__(self, tokenizer, texts: list[str], max_length: int) -> None:
        if tokenizer.pad_token_id is None:
            raise ScratchLMError("the exported tokenizer has no padding token; the probe batches examples of different lengths")
        self.pad_id = tokenizer.pad_token_id
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    def batch(self, index: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and (B, T) 0/1 attention mask of the examples at ``index``."""
        rows = [self.ids[i] for i in index]
        T = max(len(row) for row in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        return ids.to(device), mask.to(device)


def classification_scores(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Accuracy, and macro-F1: the unweighted mean of per-class F1 over every class that occurs in
    the truth or the predictions (a class never predicted scores 0)."""
    scores = []
    for k in torch.cat([predicted, truth]).unique():
        tp = ((predicted == k) & (truth == k)).sum().item()
        fp = ((predicted == k) & (truth != k)).sum().item()
        fn = ((predicted != k) & (truth == k)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": (predicted == truth).float().mean().item(), "macro_f1": sum(scores) / len(scores)}


def label_ids(probe_set: ProbeSet, split: str) -> torch.Tensor:
    index = {label: k for k, label in enumerate(probe_set.labels)}
    return torch.tensor([index[e.label] for e in getattr(probe_set, split)])


def probe_device(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")


# --- fine-tuning -------------------------------------------------------------------------------


def fine_tune(folder, probe_set: ProbeSet, spec: ProbeSpec, seed: int, device: torch.device) -> dict[str, float]:
    """Accuracy and macro-F1 of the folder's model fine-tuned as a sequence classifier."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train = Encoded(tokenizer, [e.text for e in probe_set.train], spec.max_length)
    test = Encoded(tokenizer, [e.text for e in probe_set.test], spec.max_length)
    labels = label_ids(probe_set, "train").to(device)
    torch.manual_seed(seed)  # the classifier's initial weights
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(probe_set.labels)).to(device)
    model.config.use_cache = False
    steps = max(1, math.ceil(spec.epochs * len(probe_set.train) / spec.batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    for index in shuffled_batches(len(probe_set.train), spec.batch_size, steps, seed):
        ids, mask = train.batch(index, device)
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float(), labels[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(probe_set.test), FEATURE_BATCH):
            ids, mask = test.batch(list(range(start, min(start + FEATURE_BATCH, len(probe_set.test)))), device)
            with autocast(device):
                predicted.append(model(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu())
    return classification_scores(torch.cat(predicted), label_ids(probe_set, "test"))


def shuffled_batches(n: int, batch_size: int, steps: int, seed: int):
    """``steps`` batches of example indices: passes over a fresh permutation each epoch."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def autocast(device: torch.device):
    """bf16 autocast on a GPU; nothing on a CPU (tiny models gain nothing from it there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# --- frozen features ---------------------------------------------------------------------------


@torch.no_grad()
def mean_features(model, encoded: Encoded, n: int, device: torch.device) -> torch.Tensor:
    """(N, D) last hidden states averaged over each example's real tokens, in fp32."""
    features = []
    for start in range(0, n, FEATURE_BATCH):
        ids, mask = encoded.batch(list(range(start, min(start + FEATURE_BATCH, n))), device)
        with autocast(device):
            hidden_BTD = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights_BT1 = mask[..., None].float()
        features.append(((hidden_BTD * weights_BT1).sum(1) / weights_BT1.sum(1)).cpu())
    return torch.cat(features)


def logistic_regression(x_ND: torch.Tensor, y_N: torch.Tensor, n_classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (D, C), bias (C)) minimising mean cross-entropy + ``l2``·|W|², from zeros by
    full-batch L-BFGS: the same features give the same classifier."""
    weight = torch.zeros(x_ND.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    x_ND = x_ND.double()
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=LINEAR_ITERATIONS, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(x_ND @ weight + bias, y_N) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


def linear_probe(folder, probe_set: ProbeSet, spec: ProbeSpec, device: torch.device) -> dict[str, float]:
    """Accuracy and macro-F1 of a logistic regression on the folder's frozen mean-pooled features."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with quiet_transformers():
        model = AutoModel.from_pretrained(folder)
    if model.config.is_encoder_decoder:
        model = model.get_encoder()  # the decoder's states would need a target to read
    model = model.to(device).eval()
    train_x = mean_features(model, Encoded(tokenizer, [e.text for e in probe_set.train], spec.max_length), len(probe_set.train), device)
    test_x = mean_features(model, Encoded(tokenizer, [e.text for e in probe_set.test], spec.max_length), len(probe_set.test), device)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    weight, bias = logistic_regression((train_x - mean) / std, label_ids(probe_set, "train"), len(probe_set.labels), spec.linear_l2)
    predicted = (((test_x - mean) / std).double() @ weight + bias).argmax(-1)
    return classification_scores(predicted, label_ids(probe_set, "test"))


def run_probes(folder, probe_set: ProbeSet, spec: ProbeSpec, seed: int, device: torch.device) -> dict[str, float]:
    """Both probes of one exported folder: ``finetune_*`` and ``linear_*`` accuracy and macro-F1."""
    tuned = fine_tune(folder, probe_set, spec, seed, device)
    linear = linear_probe(folder, probe_set, spec, device)
    return {
        **{f"finetune_{name}": value for name, value in tuned.items()},
        **{f"linear_{name}": value for name, value in linear.items()},
    }
