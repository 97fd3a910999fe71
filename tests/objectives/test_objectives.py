from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.objectives import IGNORE_INDEX, CausalLM, MaskedLM, MaskingConfig

PAD, CLS, SEP, MASK, EOS = 0, 2, 3, 4, 5
VOCAB = 100


def info(**overrides):
    fields = dict(
        path="tok", vocab_size=VOCAB, pad_id=PAD, eos_id=None, bos_id=None, mask_id=MASK,
        cls_id=CLS, sep_id=SEP, unk_id=1, special_ids=(0, 1, 2, 3, 4),
    )
    return SimpleNamespace(**{**fields, **overrides})


def blocks(n=8, length=64, pad_tail=10, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(10, VOCAB, size=length)
        ids[0], ids[length // 2] = CLS, SEP
        doc_ids = np.zeros(length, dtype=np.int32)
        doc_ids[length // 2 + 1 :] = 1
        if pad_tail:
            ids[-pad_tail:], doc_ids[-pad_tail:] = PAD, -1
        out.append({"input_ids": ids.astype(np.int64), "doc_ids": doc_ids})
    return out


class TinyLM(nn.Module):
    """Stands in for a model: embeds and projects, and counts how many rows its head sees."""

    is_causal = True

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)
        self.head_rows = None

    def forward(self, input_ids, attention_mask=None, *, doc_ids=None):
        self.attention_mask = attention_mask
        return self.embed(input_ids)

    def logits(self, hidden):
        self.head_rows = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        return self.head(hidden)


def test_mlm_never_masks_specials_or_padding_and_hits_the_rate():
    torch.manual_seed(0)
    mlm = MaskedLM(info(), MaskingConfig(mask_rate=0.3))
    original = torch.from_numpy(np.stack([b["input_ids"] for b in blocks(64)]))
    batch = mlm.collate(blocks(64))
    chosen = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert not chosen[:, -10:].any(), "padding was chosen"
    assert not torch.isin(original[chosen], torch.tensor([PAD, CLS, SEP])).any()
    eligible = batch["attention_mask"] & ~torch.isin(original, torch.tensor([0, 1, 2, 3, 4]))
    rate = chosen.sum() / eligible.sum()
    assert abs(rate - 0.3) < 0.02


def test_mlm_80_10_10_split():
    torch.manual_seed(1)
    mlm = MaskedLM(info(), MaskingConfig(mask_rate=0.5, replace_mask=0.6, replace_random=0.3))
    original = torch.from_numpy(np.stack([b["input_ids"] for b in blocks(200)]))
    batch = mlm.collate(blocks(200))
    chosen = batch["labels"] != IGNORE_INDEX
    corrupted = batch["input_ids"][chosen]
    as_mask = (corrupted == MASK).float().mean()
    kept = (corrupted == original[chosen]).float().mean()
    # random draws equal the original 1 time in 95, so "kept" slightly exceeds 0.1
    assert abs(as_mask - 0.6) < 0.02
    assert abs(kept - (0.1 + 0.3 / 95)) < 0.02
    assert not torch.isin(corrupted, torch.tensor([0, 1, 2, 3])).any(), "random token was a special token"
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])


def test_mlm_eval_collate_is_repeatable_and_train_collate_is_not():
    mlm = MaskedLM(info())
    a, b = mlm.eval_collate(blocks()), mlm.eval_collate(blocks())
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    c, d = mlm.collate(blocks()), mlm.collate(blocks())
    assert not torch.equal(c["labels"], d["labels"])


def test_mlm_loss_runs_head_on_masked_positions_only():
    torch.manual_seed(0)
    mlm, model = MaskedLM(info()), TinyLM()
    batch = mlm.collate(blocks())
    loss, metrics = mlm.loss(model, batch)
    assert model.head_rows == int((batch["labels"] != IGNORE_INDEX).sum())
    assert torch.isfinite(loss) and 0 <= metrics["accuracy"] <= 1


def test_mlm_always_masks_at_least_one_token():
    mlm = MaskedLM(info(), MaskingConfig(mask_rate=1e-9))
    batch = mlm.collate(blocks(1))
    assert (batch["labels"] != IGNORE_INDEX).sum() == 1


def test_mlm_needs_a_mask_token():
    with pytest.raises(ScratchLMError, match="no mask token"):
        MaskedLM(info(mask_id=None))


@pytest.mark.parametrize(
    "fields, culprit",
    [({"mask_rate": 0.0}, "mask_rate"), ({"replace_random": 1.5}, "replace_random"),
     ({"replace_mask": 0.8, "replace_random": 0.3}, "replace_mask \\+ replace_random")],
)
def test_masking_config_names_the_bad_field(fields, culprit):
    with pytest.raises(ScratchLMError, match=culprit):
        MaskingConfig(**fields)


def test_clm_labels_shift_keep_eos_and_skip_padding():
    ids = np.array([7, 8, EOS, 9, 10, 11, EOS, PAD, PAD], dtype=np.int64)
    doc_ids = np.array([0, 0, 0, 1, 1, 1, 1, -1, -1], dtype=np.int32)
    batch = CausalLM(info(eos_id=EOS)).collate([{"input_ids": ids, "doc_ids": doc_ids}])
    assert batch["labels"][0].tolist() == [8, EOS, 9, 10, 11, EOS, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][0].tolist() == [True] * 7 + [False] * 2


def test_clm_loss_ignores_padding():
    torch.manual_seed(0)
    clm, model = CausalLM(info(eos_id=EOS)), TinyLM()
    batch = clm.collate(blocks())
    loss, _ = clm.loss(model, batch)
    changed = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    changed["input_ids"][:, -9:] = 42  # padding positions (inputs and their would-be targets)
    changed_loss, _ = clm.loss(model, changed)
    # Position -10 (the last real token) targets padding, so it is not scored either.
    assert torch.allclose(loss, changed_loss)


def test_clm_with_document_masks_does_not_ask_across_documents_and_passes_doc_ids():
    ids = np.array([7, 8, EOS, 9, 10, EOS, PAD], dtype=np.int64)
    doc_ids = np.array([0, 0, 0, 1, 1, 1, -1], dtype=np.int32)
    clm = CausalLM(info(eos_id=EOS), document_masks=True)
    batch = clm.collate([{"input_ids": ids, "doc_ids": doc_ids}])
    assert batch["labels"][0].tolist() == [8, EOS, IGNORE_INDEX, 10, EOS, IGNORE_INDEX, IGNORE_INDEX]

    seen = {}

    class Spy(TinyLM):
        def forward(self, input_ids, attention_mask=None, *, doc_ids=None):
            seen["doc_ids"] = doc_ids
            return super().forward(input_ids, attention_mask)

    clm.loss(Spy(), batch)
    assert torch.equal(seen["doc_ids"], batch["doc_ids"])
    CausalLM(info(eos_id=EOS)).loss(Spy(), batch)
    assert seen["doc_ids"] is None, "without document masks, packed documents attend to each other"


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_full_blocks_reach_the_model_without_a_mask_and_padded_ones_with_it(objective):
    """No padding, no mask: SDPA may then run its fused kernels."""
    built = CausalLM(info(eos_id=EOS)) if objective == "clm" else MaskedLM(info())
    model = TinyLM()
    full = built.collate(blocks(pad_tail=0))
    assert full["padded"] is False
    built.loss(model, full)
    assert model.attention_mask is None
    padded = built.collate(blocks(pad_tail=10))
    assert padded["padded"] is True
    built.loss(model, padded)
    assert torch.equal(model.attention_mask, padded["attention_mask"])
