"""GPT-2 -> ``transformers.GPT2LMHeadModel``: the name map, the weight conversion and the HF config."""

import torch
import transformers

from scratchlm.models.gpt2 import GPT2, GPT2Config

HF_CLASS = transformers.GPT2LMHeadModel
AUTO_CLASS = transformers.AutoModelForCausalLM

EMBEDDINGS_AND_NORM: dict[str, str] = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "final_norm.weight": "transformer.ln_f.weight",
    "final_norm.bias": "transformer.ln_f.bias",
}
"""Our name -> HF name, outside the blocks. ``lm_head.weight`` is ``transformer.wte.weight``: HF
ties it on load, so it is written once."""

BLOCK: dict[str, str] = {
    "attn_norm.weight": "ln_1.weight",
    "attn_norm.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight",
    "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight",
    "attn.proj.bias": "attn.c_proj.bias",
    "mlp_norm.weight": "ln_2.weight",
    "mlp_norm.bias": "ln_2.bias",
    "mlp.fc.weight": "mlp.c_fc.weight",
    "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight",
    "mlp.proj.bias": "mlp.c_proj.bias",
}
"""Our name under ``blocks.{i}.`` -> HF name under ``transformer.h.{i}.``. Both fuse QKV the same
way (queries, keys, values along the output dimension, heads contiguous in each)."""

CONV1D: frozenset[str] = frozenset({"attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"})
"""Block weights stored transposed: HF GPT-2 keeps OpenAI's ``Conv1D`` layout, (in, out), where
``nn.Linear`` keeps (out, in)."""


def name_map(n_layers: int) -> dict[str, str]:
    """Every parameter of a ``GPT2`` with ``n_layers`` blocks -> its HF name."""
    names = dict(EMBEDDINGS_AND_NORM)
    for i in range(n_layers):
        for ours, theirs in BLOCK.items():
            names[f"blocks.{i}.{ours}"] = f"transformer.h.{i}.{theirs}"
    return names


def hf_state_dict(model: GPT2) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under ``GPT2LMHeadModel``'s names and layouts."""
    ours = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for name, target in name_map(model.config.n_layers).items():
        tensor = ours.pop(name)
        in_block = name.split(".", 2)[-1]  # "blocks.3.attn.qkv.weight" -> "attn.qkv.weight"
        out[target] = tensor.t() if name.startswith("blocks.") and in_block in CONV1D else tensor
    if ours:
        raise AssertionError(f"gpt2 parameters missing from the export name map: {sorted(ours)}")
    return out


def hf_config(config: GPT2Config, special_ids: dict[str, int | None]) -> transformers.GPT2Config:
    """The ``transformers.GPT2Config`` that makes ``GPT2LMHeadModel`` compute what ``GPT2`` does."""
    return transformers.GPT2Config(
        architectures=[HF_CLASS.__name__],
        vocab_size=config.vocab_size,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_ff,
        n_positions=config.max_positions,
        # The same tanh approximation as GPT-2's "gelu_new", computed by the same PyTorch op
        # that models.gpt2 calls, so the two agree to the last bit.
        activation_function="gelu_pytorch_tanh",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        scale_attn_weights=True,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        tie_word_embeddings=True,
    )
