"""BART -> ``transformers.BartForConditionalGeneration``: the name map, the weight conversion and the HF config."""

import torch
import transformers

from scratchlm.models.bart import Bart, BartConfig

HF_CLASS = transformers.BartForConditionalGeneration
AUTO_CLASS = transformers.AutoModelForSeq2SeqLM

POSITION_OFFSET = 2
"""HF's BART looks up position p in row p + 2 of its position tables (a fairseq legacy: rows 0 and
1 were reserved for padding); our tables start at row 0, so two unused rows go in front."""

OUTSIDE_BLOCKS: dict[str, str] = {
    "tok_emb.weight": "model.shared.weight",
    "encoder_embeddings.pos_emb.weight": "model.encoder.embed_positions.weight",
    "encoder_embeddings.norm.weight": "model.encoder.layernorm_embedding.weight",
    "encoder_embeddings.norm.bias": "model.encoder.layernorm_embedding.bias",
    "decoder_embeddings.pos_emb.weight": "model.decoder.embed_positions.weight",
    "decoder_embeddings.norm.weight": "model.decoder.layernorm_embedding.weight",
    "decoder_embeddings.norm.bias": "model.decoder.layernorm_embedding.bias",
}
"""Our name -> HF name, outside the blocks. ``model.encoder.embed_tokens``,
``model.decoder.embed_tokens`` and ``lm_head`` are ``model.shared``: HF ties them on load, so the
table is written once."""

SELF_ATTENTION_AND_MLP: dict[str, str | tuple[str, ...]] = {
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "attn_norm.weight": "self_attn_layer_norm.weight",
    "attn_norm.bias": "self_attn_layer_norm.bias",
    "mlp.fc.weight": "fc1.weight",
    "mlp.fc.bias": "fc1.bias",
    "mlp.proj.weight": "fc2.weight",
    "mlp.proj.bias": "fc2.bias",
    "mlp_norm.weight": "final_layer_norm.weight",
    "mlp_norm.bias": "final_layer_norm.bias",
}
"""Our name inside an encoder or decoder block -> HF name inside the layer. A tuple means our fused
tensor is split along its output rows, in that order."""

CROSS_ATTENTION: dict[str, str | tuple[str, ...]] = {
    "cross_attn.q.weight": "encoder_attn.q_proj.weight",
    "cross_attn.q.bias": "encoder_attn.q_proj.bias",
    "cross_attn.kv.weight": ("encoder_attn.k_proj.weight", "encoder_attn.v_proj.weight"),
    "cross_attn.kv.bias": ("encoder_attn.k_proj.bias", "encoder_attn.v_proj.bias"),
    "cross_attn.proj.weight": "encoder_attn.out_proj.weight",
    "cross_attn.proj.bias": "encoder_attn.out_proj.bias",
    "cross_norm.weight": "encoder_attn_layer_norm.weight",
    "cross_norm.bias": "encoder_attn_layer_norm.bias",
}
"""Our name inside a decoder block -> HF name inside ``model.decoder.layers.{i}``, beyond the above."""


def name_map(config: BartConfig) -> dict[str, str | tuple[str, ...]]:
    """Every parameter of a ``Bart`` of ``config`` -> its HF name(s)."""
    names: dict[str, str | tuple[str, ...]] = dict(OUTSIDE_BLOCKS)
    stacks = [
        ("encoder_blocks", "model.encoder.layers", config.n_layers, SELF_ATTENTION_AND_MLP),
        ("decoder_blocks", "model.decoder.layers", config.n_decoder_layers, SELF_ATTENTION_AND_MLP | CROSS_ATTENTION),
    ]
    for ours_prefix, hf_prefix, n_blocks, block_map in stacks:
        for i in range(n_blocks):
            for ours, theirs in block_map.items():
                hf = f"{hf_prefix}.{i}."
                split = isinstance(theirs, tuple)
                names[f"{ours_prefix}.{i}.{ours}"] = tuple(hf + t for t in theirs) if split else hf + theirs
    return names


def hf_state_dict(model: Bart) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under ``BartForConditionalGeneration``'s names and layouts."""
    ours = dict(model.state_dict())
    # HF adds this (1, V) buffer to the logits, as ours adds ``logit_bias``.
    out: dict[str, torch.Tensor] = {"final_logits_bias": ours.pop("logit_bias")[None].clone()}
    for name, target in name_map(model.config).items():
        tensor = ours.pop(name)
        if isinstance(target, tuple):
            out.update(zip(target, tensor.chunk(len(target), dim=0)))  # (nD, ...) -> n x (D, ...)
        elif name.endswith("pos_emb.weight"):
            out[target] = torch.cat([tensor.new_zeros(POSITION_OFFSET, tensor.shape[1]), tensor])
        else:
            out[target] = tensor
    if ours:
        raise AssertionError(f"bart parameters missing from the export name map: {sorted(ours)}")
    return out


def hf_config(config: BartConfig, special_ids: dict[str, int | None]) -> transformers.BartConfig:
    """The ``transformers.BartConfig`` that makes ``BartForConditionalGeneration`` compute what
    ``Bart`` does.

    The decoder starts from the end-of-text token, as in every BART checkpoint. HF's default
    ``forced_eos_token_id`` (and the ``forced_bos_token_id`` some checkpoints set) is cleared:
    forcing tokens would make ``generate()`` differ from plain greedy decoding of the model we
    trained, and nothing in pre-training needs it.
    """
    return transformers.BartConfig(
        architectures=[HF_CLASS.__name__],
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        encoder_layers=config.n_layers,
        decoder_layers=config.n_decoder_layers,
        encoder_attention_heads=config.n_heads,
        decoder_attention_heads=config.n_heads,
        encoder_ffn_dim=config.d_ff,
        decoder_ffn_dim=config.d_ff,
        max_position_embeddings=config.max_positions,
        activation_function="gelu",  # exact erf GELU, as models.bart uses
        dropout=config.dropout,
        attention_dropout=config.dropout,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        init_std=0.02,
        scale_embedding=False,
        pad_token_id=special_ids.get("pad"),
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        decoder_start_token_id=special_ids.get("eos"),
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        is_encoder_decoder=True,
        tie_word_embeddings=True,
    )
