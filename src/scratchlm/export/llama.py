"""Llama -> ``transformers.LlamaForCausalLM``: the name map, the split of fused weights and the HF config."""

import torch
import transformers

from scratchlm.models.llama import Llama, LlamaConfig

HF_CLASS = transformers.LlamaForCausalLM
AUTO_CLASS = transformers.AutoModelForCausalLM

OUTSIDE_BLOCKS: dict[str, str] = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
"""Our name -> HF name, outside the blocks. ``head.weight`` exists only with an untied head; a
tied ``lm_head.weight`` is ``model.embed_tokens.weight``, which HF ties on load (written once)."""

BLOCK: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
"""Our name under ``blocks.{i}.`` -> HF name under ``model.layers.{i}.``, same layout."""

FUSED: dict[str, tuple[str, ...]] = {
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
"""Our fused block weight -> the HF weights it is cut into along the output dimension, in order
(see ``split_sizes``). Heads are contiguous in both: HF views q/k/v_proj outputs as (T, heads, K)."""


def split_sizes(config: LlamaConfig) -> dict[str, list[int]]:
    """Rows of each fused weight that go to each HF weight of ``FUSED``: queries H·K, keys and
    values G·K each; gate and up F each."""
    K = config.head_dim
    return {
        "attn.qkv.weight": [config.n_heads * K, config.n_kv_heads * K, config.n_kv_heads * K],
        "mlp.gate_up.weight": [config.d_ff, config.d_ff],
    }


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under ``LlamaForCausalLM``'s names, fused weights split."""
    ours = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for name, target in OUTSIDE_BLOCKS.items():
        if name in ours:
            out[target] = ours.pop(name)
    sizes = split_sizes(model.config)
    for i in range(model.config.n_layers):
        for name, target in BLOCK.items():
            out[f"model.layers.{i}.{target}"] = ours.pop(f"blocks.{i}.{name}")
        for name, targets in FUSED.items():
            parts = ours.pop(f"blocks.{i}.{name}").split(sizes[name], dim=0)
            for target, part in zip(targets, parts, strict=True):
                out[f"model.layers.{i}.{target}"] = part
    if ours:
        raise AssertionError(f"llama parameters missing from the export name map: {sorted(ours)}")
    return out


def hf_config(config: LlamaConfig, special_ids: dict[str, int | None]) -> transformers.LlamaConfig:
    """The ``transformers.LlamaConfig`` that makes ``LlamaForCausalLM`` compute what ``Llama`` does."""
    return transformers.LlamaConfig(
        architectures=[HF_CLASS.__name__],
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_positions,
        rms_norm_eps=config.norm_eps,
        # transformers 5 takes RoPE settings as one dict; 4 reads rope_theta (see v4_fields).
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.dropout,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
    )


def v4_fields(config: LlamaConfig) -> dict:
    """RoPE's theta under the name transformers 4 reads (5 reads ``rope_parameters``)."""
    return {"rope_theta": float(config.rope_theta)}
