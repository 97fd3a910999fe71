"""The arms: FLOPs counted from the model, budgets turned into steps, one token stream for all."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scratchlm.compare.arms import (
    arm_size,
    build_datamodule,
    build_module,
    flop_count,
    head_parameters,
    seconds_per_step,
    steps_for_budget,
)
from scratchlm.compare.config import Arm, Budget, CompareConfig, DataSpec, ModelSpec
from scratchlm.errors import ScratchLMError
from scratchlm.models import build_config, build_model
from scratchlm.objectives import SpanConfig
from scratchlm.objectives.span import span_lengths

T = 32


def tiny(family: str, vocab_size: int = 500):
    config = build_config(family, "tiny", vocab_size=vocab_size, n_layers=2, d_model=32, n_heads=2, d_ff=64)
    return build_model(family, config)


def measured_forward_flops_per_token(model, length: int) -> float:
    """Matmul FLOPs of one forward pass with the head on every position, as torch counts them.
    Attention runs on the math backend, whose matmuls the counter sees (it skips fused kernels)."""
    ids = torch.randint(10, 400, (1, length))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.logits(model(ids))
    return counter.get_total_flops() / length


@pytest.mark.parametrize("family", ["modernbert", "modernbert-causal", "bert", "gpt2"])
def test_flop_formula_matches_what_torch_counts(family):
    model = tiny(family)
    count = flop_count(model, "clm", T, mask_rate=0.15)  # clm: the head on every position, as measured
    # The training formula is 3x the forward one (backward costs twice the forward).
    formula_forward = count.per_token / 3
    measured = measured_forward_flops_per_token(model, T)
    # Norms, biases and activations are parameters or work that matmul counting leaves out.
    assert formula_forward == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_flop_formula_matches_what_torch_counts(family):
    """Per block token: the encoder on S positions, the decoder and head on T, attention on
    S x S, T x T and T x S; a block of T=32 tokens as span corruption makes it (S=30, T=8)."""
    model = build_model(family, build_config(family, "tiny", vocab_size=500, n_layers=2, n_decoder_layers=2,
                                             d_model=32, n_heads=2, d_ff=64))
    S, T_dec = span_lengths(T, SpanConfig())
    count = flop_count(model, "span", T, mask_rate=0.15, lengths=(S, T_dec))
    encoder_ids, decoder_ids = torch.randint(10, 400, (1, S)), torch.randint(10, 400, (1, T_dec))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.logits(model(encoder_ids, None, decoder_ids))
    assert count.per_token / 3 == pytest.approx(counter.get_total_flops() / T, rel=0.05)
    # The encoder side, by name: the encoder stack and the cross-attention keys and values,
    # which read the encoder's output. Embedding tables cost nothing.
    encoder_prefix, cross_kv = {"t5": ("encoder.", ".cross.kv."), "bart": ("encoder_", ".cross_attn.kv.")}[family]
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    by_name = sum(p.numel() for n, p in model.named_parameters()
                  if (n.startswith(encoder_prefix) or cross_kv in n) and id(p) not in tables)
    assert count.encoder == by_name
    with pytest.raises(ValueError, match="lengths"):
        flop_count(model, "span", T, mask_rate=0.15)


def test_the_mlm_head_counts_only_on_masked_positions():
    """And so does the last block but for its keys and values: the model runs it there alone."""
    model = tiny("modernbert")
    clm = flop_count(model, "clm", T, mask_rate=0.3)
    mlm = flop_count(model, "mlm", T, mask_rate=0.3)
    assert mlm.body == clm.body and mlm.head == clm.head and clm.tail == 0 < mlm.tail
    last_layer_attention = 12 * T * model.config.d_model
    assert clm.per_token - mlm.per_token == pytest.approx(6 * 0.7 * (clm.head + mlm.tail) + 0.7 * last_layer_attention)


def test_head_parameters_include_the_tied_output_matrix():
    gpt2 = tiny("gpt2")
    assert [p.shape for p in head_parameters(gpt2)] == [gpt2.tok_emb.weight.shape]  # (V, D), tied
    modernbert = tiny("modernbert")
    head = head_parameters(modernbert)
    assert any(p is modernbert.tok_emb.weight for p in head)
    assert not any(p is block_param for block_param in modernbert.blocks.parameters() for p in head)


def test_budgets_turn_into_whole_steps():
    count = flop_count(tiny("gpt2"), "clm", T, 0.15)
    per_step = 8 * T
    assert steps_for_budget(Budget(tokens=1000), count, per_step, None) == math.ceil(1000 / per_step)
    flops = 10 * per_step * count.per_token
    assert steps_for_budget(Budget(flops=flops), count, per_step, None) == 10
    assert steps_for_budget(Budget(minutes=0.5), count, per_step, step_seconds=0.1) == 300
    assert steps_for_budget(Budget(tokens=1), count, per_step, None) == 1


@pytest.mark.parametrize(
    "budget, message",
    [(Budget(), "no budget"), (Budget(tokens=10, flops=1e9), "several budgets"), (Budget(minutes=-1), "budget.minutes")],
)
def test_a_budget_must_be_exactly_one_positive_number(budget, message):
    with pytest.raises(ScratchLMError, match=message):
        budget.check()


def config_for(tokenizer: str) -> CompareConfig:
    return CompareConfig(
        out="unused",
        model=ModelSpec(arch={"n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64}),
        data=DataSpec(tokenizer=tokenizer, block_size=T, batch_size=4),
        budget=Budget(tokens=1000),
    )


def test_twin_arms_start_from_the_same_weights(bert_style_tokenizer):
    config = config_for(bert_style_tokenizer)
    encoder = build_module(Arm("mlm", "modernbert"), config, bert_style_tokenizer, seed=3).model
    decoder = build_module(Arm("clm", "modernbert-causal"), config, bert_style_tokenizer, seed=3).model
    other_seed = build_module(Arm("clm", "modernbert-causal"), config, bert_style_tokenizer, seed=4).model
    ours, theirs, other = encoder.state_dict(), decoder.state_dict(), other_seed.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not all(torch.equal(ours[k], other[k]) for k in ours)


def test_every_arm_of_a_seed_reads_the_same_blocks_in_the_same_order(bert_style_tokenizer):
    config = config_for(bert_style_tokenizer)

    def first_blocks(seed: int) -> list[np.ndarray]:
        stream = build_datamodule(config, bert_style_tokenizer, seed)
        stream.setup("fit")
        return [b["input_ids"] for b in itertools.islice(stream.train_dataloader().dataset, 12)]

    mlm_arm, clm_arm, next_seed = first_blocks(0), first_blocks(0), first_blocks(1)
    assert all(np.array_equal(a, b) for a, b in zip(mlm_arm, clm_arm))
    assert not all(np.array_equal(a, b) for a, b in zip(mlm_arm, next_seed))  # seeds reorder the stream


def test_the_classic_pair_builds_with_the_same_width_and_depth(bert_style_tokenizer):
    config = config_for(bert_style_tokenizer)
    bert = build_module(Arm("mlm", "bert"), config, bert_style_tokenizer, seed=0).model
    gpt2 = build_module(Arm("clm", "gpt2"), config, bert_style_tokenizer, seed=0).model
    assert (bert.config.n_layers, bert.config.d_model) == (gpt2.config.n_layers, gpt2.config.d_model) == (2, 32)


def test_a_minutes_budget_is_timed_on_the_arm_itself(bert_style_tokenizer, tmp_path):
    config = config_for(bert_style_tokenizer)
    config.out = str(tmp_path)
    seconds = seconds_per_step(Arm("clm", "modernbert-causal"), config, bert_style_tokenizer)
    assert 0 < seconds < 10
    assert list(tmp_path.iterdir()) == []  # the timed run leaves nothing behind


def test_the_span_arm_matches_the_tiny_width_and_depth_and_counts_block_tokens(span_tokenizer):
    config = CompareConfig(out="unused", data=DataSpec(tokenizer=span_tokenizer, block_size=T, batch_size=4),
                           budget=Budget(tokens=1000))
    mlm = arm_size(Arm("mlm", "modernbert"), config, span_tokenizer)
    span = arm_size(Arm("span", "t5"), config, span_tokenizer)
    assert mlm.shape["d_model"] == span.shape["d_model"] == 128
    assert mlm.shape["layers"] == span.shape["layers"] + span.shape["decoder_layers"] == 4
    assert (span.flops.block_size, span.flops.encoder_length, span.flops.decoder_length) == (T, *span_lengths(T, SpanConfig()))
    # The same token budget is the same steps of the shared stream for every arm.
    assert steps_for_budget(config.budget, mlm.flops, 4 * T, None) == steps_for_budget(config.budget, span.flops, 4 * T, None)


@pytest.mark.parametrize(
    "family, objective, message",
    [("t5", "mlm", "does not fit family t5"), ("modernbert", "span", "does not fit family modernbert"),
     ("bart", None, "trains with infill")],
)
def test_an_objective_the_family_cannot_train_or_compare_cannot_score_is_refused(family, objective, message):
    with pytest.raises(ScratchLMError, match=message):
        Arm("x", family, objective)
