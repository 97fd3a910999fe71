"""T5 -> ``transformers.T5ForConditionalGeneration``: the name map, the split of fused weights and the HF config.

Nothing needs folding: HF's T5 does not scale attention scores either, and its final hidden states
go to the head unscaled when the head is untied (HF config ``scale_decoder_outputs = false``).
"""

import torch
import transformers

from scratchlm.models.t5 import T5, T5Config

HF_CLASS = transformers.T5ForConditionalGeneration
AUTO_CLASS = transformers.AutoModelForSeq2SeqLM

OUTSIDE_BLOCKS: dict[str, str] = {
    "tok_emb.weight": "shared.weight",
    "head.weight": "lm_head.weight",
    "encoder.position_bias.table.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder.final_norm.weight": "encoder.final_layer_norm.weight",
    "decoder.position_bias.table.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "decoder.final_norm.weight": "decoder.final_layer_norm.weight",
}
"""Our name -> HF name, outside the blocks. HF keeps each stack's position bias in its first
block's self-attention and reuses it in the others, as we do at stack level. HF's
``encoder.embed_tokens`` and ``decoder.embed_tokens`` are ``shared``, tied on load (written once)."""

ENCODER_BLOCK: dict[str, str] = {
    "attn_norm.weight": "layer.0.layer_norm.weight",
    "attn.proj.weight": "layer.0.SelfAttention.o.weight",
    "mlp_norm.weight": "layer.1.layer_norm.weight",
    "mlp.proj.weight": "layer.1.DenseReluDense.wo.weight",
}
"""Our name under ``encoder.blocks.{i}.`` -> HF name under ``encoder.block.{i}.``, same layout."""

DECODER_BLOCK: dict[str, str] = {
    "attn_norm.weight": "layer.0.layer_norm.weight",
    "attn.proj.weight": "layer.0.SelfAttention.o.weight",
    "cross_norm.weight": "layer.1.layer_norm.weight",
    "cross.q.weight": "layer.1.EncDecAttention.q.weight",
    "cross.proj.weight": "layer.1.EncDecAttention.o.weight",
    "mlp_norm.weight": "layer.2.layer_norm.weight",
    "mlp.proj.weight": "layer.2.DenseReluDense.wo.weight",
}
"""Our name under ``decoder.blocks.{i}.`` -> HF name under ``decoder.block.{i}.``, same layout."""

ENCODER_FUSED: dict[str, tuple[str, ...]] = {
    "attn.qkv.weight": (
        "layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight", "layer.0.SelfAttention.v.weight"
    ),
    "mlp.gate_up.weight": ("layer.1.DenseReluDense.wi_0.weight", "layer.1.DenseReluDense.wi_1.weight"),
}
"""Our fused encoder-block weight -> the HF weights it is cut into along the output dimension, in
equal parts and in order. Heads are contiguous in both: HF views q/k/v outputs as (T, heads, K)."""

DECODER_FUSED: dict[str, tuple[str, ...]] = {
    "attn.qkv.weight": (
        "layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight", "layer.0.SelfAttention.v.weight"
    ),
    "cross.kv.weight": ("layer.1.EncDecAttention.k.weight", "layer.1.EncDecAttention.v.weight"),
    "mlp.gate_up.weight": ("layer.2.DenseReluDense.wi_0.weight", "layer.2.DenseReluDense.wi_1.weight"),
}
"""The same for decoder blocks."""


def hf_state_dict(model: T5) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under ``T5ForConditionalGeneration``'s names, fused weights split."""
    ours = dict(model.state_dict())
    out = {target: ours.pop(name) for name, target in OUTSIDE_BLOCKS.items()}
    stacks = [
        ("encoder", model.config.n_layers, ENCODER_BLOCK, ENCODER_FUSED),
        ("decoder", model.config.n_decoder_layers, DECODER_BLOCK, DECODER_FUSED),
    ]
    for stack, n_layers, same, fused in stacks:
        for i in range(n_layers):
            for name, target in same.items():
                out[f"{stack}.block.{i}.{target}"] = ours.pop(f"{stack}.blocks.{i}.{name}")
            for name, targets in fused.items():
                parts = ours.pop(f"{stack}.blocks.{i}.{name}").chunk(len(targets), dim=0)
                for target, part in zip(targets, parts, strict=True):
                    out[f"{stack}.block.{i}.{target}"] = part
    if ours:
        raise AssertionError(f"t5 parameters missing from the export name map: {sorted(ours)}")
    return out


def hf_config(config: T5Config, special_ids: dict[str, int | None]) -> transformers.T5Config:
    """The ``transformers.T5Config`` that makes ``T5ForConditionalGeneration`` compute what ``T5`` does.

    ``tie_word_embeddings=False`` keeps HF from scaling the decoder output by d_model^-0.5 before
    the head. transformers 5 records that as ``scale_decoder_outputs: false`` and sets
    ``tie_word_embeddings`` back to true (the head is still loaded as its own matrix, because
    ``lm_head.weight`` and ``shared.weight`` both come from the file with different values); it is
    written as false again, because transformers 4 reads only that field: with ``true`` it ties the
    head to the embedding and scales the decoder output (max |logit difference| 4.5 on 4.57).
    transformers 5 reads the written false as ``scale_decoder_outputs = false`` too.
    """
    hf = transformers.T5Config(
        architectures=[HF_CLASS.__name__],
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.head_dim,
        d_ff=config.d_ff,
        num_layers=config.n_layers,
        num_decoder_layers=config.n_decoder_layers,
        num_heads=config.n_heads,
        relative_attention_num_buckets=config.num_buckets,
        relative_attention_max_distance=config.max_distance,
        dropout_rate=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=special_ids.get("pad"),
        eos_token_id=special_ids.get("eos"),
        decoder_start_token_id=special_ids.get("pad"),
    )
    hf.tie_word_embeddings = False
    return hf
