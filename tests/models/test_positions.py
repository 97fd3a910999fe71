"""Hidden states at chosen positions only: the last block runs where the MLM loss looks, and
gives exactly those rows of the full output."""

import pytest
import torch

from scratchlm.models import build_config, build_model
from scratchlm.models.layers import gather_positions
from scratchlm.objectives import MaskedLM, MaskingConfig
from scratchlm.tokenizer import TokenizerInfo

V, B, T = 64, 3, 16


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    arch = {"local_window": 6} if family == "modernbert" else {}  # a window shorter than T: a band mask
    config = build_config(family, "tiny", vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, **arch)
    return build_model(family, config).eval()


@pytest.mark.parametrize("family", ["bert", "modernbert"])
@pytest.mark.parametrize("masks", ["none", "padding", "documents"])
def test_positions_give_those_rows_of_the_full_output(family, masks):
    model = tiny(family)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, V, (B, T), generator=generator)
    attention_mask = torch.ones(B, T, dtype=torch.bool)
    attention_mask[1, 11:] = False
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 11 + [-1] * 5, [0] * 16])
    kwargs = {
        "none": {},
        "padding": {"attention_mask": attention_mask},
        "documents": {"attention_mask": attention_mask, "doc_ids": doc_ids},
    }[masks]
    positions = torch.stack([torch.randperm(T, generator=generator)[:5] for _ in range(B)])

    full = model(input_ids, **kwargs)
    chosen = model(input_ids, **kwargs, positions=positions)
    assert chosen.shape == (B, 5, 32)
    torch.testing.assert_close(chosen, gather_positions(full, positions), rtol=1e-5, atol=1e-5)

    weight = torch.randn(B, 5, 32, generator=generator)
    params = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    grads = torch.autograd.grad((chosen * weight).sum(), params)
    grads_ref = torch.autograd.grad((gather_positions(model(input_ids, **kwargs), positions) * weight).sum(), params)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fixed_count", [False, True])
def test_mlm_loss_is_the_same_with_and_without_positions(fixed_count):
    """The loss through the short cut equals the loss of a model that computes every position."""
    model = tiny("modernbert")
    info = TokenizerInfo(
        path="(synthetic)", vocab_size=V, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, eos_id=None, bos_id=None,
        special_ids=(0, 1, 2, 3, 4), model_max_length=None, file_texts={},
    )
    objective = MaskedLM(info, MaskingConfig(mask_rate=0.25, fixed_count=fixed_count))
    rng = torch.Generator().manual_seed(2)
    blocks = [{"input_ids": torch.randint(5, V, (T,), generator=rng).numpy(), "doc_ids": torch.zeros(T, dtype=torch.int32).numpy()} for _ in range(B)]
    batch = objective.eval_collate(blocks)

    class EveryPosition(torch.nn.Module):  # the same model, without the short cut
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def vocab_projection(self, hidden):
            return self.inner.vocab_projection(hidden)

    loss, metrics = objective.loss(model, batch)
    loss_ref, metrics_ref = objective.loss(EveryPosition(model), batch)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(metrics["accuracy"], metrics_ref["accuracy"])
    # The collate found the masked positions ahead of the step; a batch built elsewhere is fine too.
    assert batch["masked_rows"].numel() == (batch["labels"] != -100).sum()
    bare = {k: v for k, v in batch.items() if k not in ("masked_positions", "masked_rows")}
    torch.testing.assert_close(objective.loss(model, bare)[0], loss)


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_mlm_flops_count_the_last_block_on_the_masked_share(family):
    """The FLOPs of training bert with MLM count the last block's queries, output projection and
    MLP on the masked positions only, as it runs them: within 5% of what torch counts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from scratchlm.training.flops import flop_count

    model, length, chosen = tiny(family), 64, 16
    ids = torch.randint(5, V, (1, length))
    positions = torch.randperm(length)[:chosen][None]
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.logits(model(ids, positions=positions))
    count = flop_count(model, "mlm", length, mask_rate=chosen / length)
    assert count.tail > 0
    assert count.per_token / 3 == pytest.approx(counter.get_total_flops() / length, rel=0.05)
    dense = flop_count(model, "clm", length, mask_rate=1.0)  # every position through every layer
    assert dense.tail == 0 and dense.per_token > count.per_token


def test_causal_models_take_no_positions():
    model = tiny("modernbert-causal")
    assert not model.takes_positions
    with pytest.raises(ValueError, match="bidirectional"):
        model(torch.randint(5, V, (1, 8)), positions=torch.zeros(1, 2, dtype=torch.long))
