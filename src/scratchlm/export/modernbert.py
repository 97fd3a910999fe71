"""ModernBERT -> ``transformers.ModernBertForMaskedLM``, and its causal twin ->
``transformers.ModernBertDecoderForCausalLM``: the name maps, the weight conversion and the HF configs.

Both HF classes hold the same backbone under ``model.`` and the same head (dense, GELU, norm, a
decoder tied to the embedding with a bias); they differ in the head's name (``head`` /
``lm_head``), in the decoder's split q/k/v projections, and in their configs.
"""

import torch
import transformers

from scratchlm.errors import ScratchLMError
from scratchlm.models.modernbert import ModernBert, ModernBertCausal, ModernBertConfig

HF_CLASS = transformers.ModernBertForMaskedLM
AUTO_CLASS = transformers.AutoModelForMaskedLM
CAUSAL_HF_CLASS = transformers.ModernBertDecoderForCausalLM
CAUSAL_AUTO_CLASS = transformers.AutoModelForCausalLM
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

OUTSIDE_BLOCKS: dict[str, str] = {
    "tok_emb.weight": "model.embeddings.tok_embeddings.weight",
    "emb_norm.weight": "model.embeddings.norm.weight",
    "final_norm.weight": "model.final_norm.weight",
    "head.dense.weight": "head.dense.weight",
    "head.norm.weight": "head.norm.weight",
    "head.bias": "decoder.bias",
}
"""Our name -> ``ModernBertForMaskedLM`` name, outside the blocks. ``decoder.weight`` is the token
embedding table: HF ties it on load, so it is written once."""

CAUSAL_OUTSIDE_BLOCKS: dict[str, str] = {
    **OUTSIDE_BLOCKS,
    "head.dense.weight": "lm_head.dense.weight",
    "head.norm.weight": "lm_head.norm.weight",
}
"""The same for ``ModernBertDecoderForCausalLM``, whose head is called ``lm_head``."""

BLOCK: dict[str, str | tuple[str, ...]] = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.qkv.weight": "attn.Wqkv.weight",
    "attn.proj.weight": "attn.Wo.weight",
    "mlp_norm.weight": "mlp_norm.weight",
    "mlp.fc.weight": "mlp.Wi.weight",
    "mlp.proj.weight": "mlp.Wo.weight",
}
"""Our name under ``blocks.{i}.`` -> HF name under ``model.layers.{i}.``. Both fuse QKV as
(3, H, K) along the output rows and put GeGLU's GELU branch before its gate in ``Wi``. Block 0
has no ``attn_norm`` on either side."""

CAUSAL_BLOCK: dict[str, str | tuple[str, ...]] = {
    **BLOCK,
    "attn.qkv.weight": ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"),
}
"""The same for the decoder, whose attention has separate projections: a tuple means our fused
QKV tensor is split along its output rows into query, key and value (in that order)."""


def name_map(
    n_layers: int, outside: dict[str, str], block: dict[str, str | tuple[str, ...]]
) -> dict[str, str | tuple[str, ...]]:
    """Every parameter of a model with ``n_layers`` blocks -> its HF name(s)."""
    names: dict[str, str | tuple[str, ...]] = dict(outside)
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in block.items():
            if i == 0 and ours == "attn_norm.weight":
                continue  # block 0 reads the normalised embeddings directly (see ModernBertBlock)
            names[f"blocks.{i}.{ours}"] = (
                tuple(prefix + t for t in theirs) if isinstance(theirs, tuple) else prefix + theirs
            )
    return names


def convert(model: ModernBert, names: dict[str, str | tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under HF ``names``, fused QKV split where a name is a tuple."""
    ours = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for name, target in names.items():
        tensor = ours.pop(name)
        if isinstance(target, tuple):
            out.update(zip(target, tensor.chunk(3, dim=0), strict=True))  # (3D, D) -> 3 x (D, D)
        else:
            out[target] = tensor
    if ours:
        raise AssertionError(f"modernbert parameters missing from the export name map: {sorted(ours)}")
    return out


def hf_state_dict(model: ModernBert) -> dict[str, torch.Tensor]:
    """The weights of the encoder under ``ModernBertForMaskedLM``'s names."""
    return convert(model, name_map(model.config.n_layers, OUTSIDE_BLOCKS, BLOCK))


def causal_hf_state_dict(model: ModernBertCausal) -> dict[str, torch.Tensor]:
    """The weights of the causal twin under ``ModernBertDecoderForCausalLM``'s names."""
    return convert(model, name_map(model.config.n_layers, CAUSAL_OUTSIDE_BLOCKS, CAUSAL_BLOCK))


# --- configs -------------------------------------------------------------------------------------


def shared_fields(config: ModernBertConfig) -> dict:
    """The HF config fields both classes share, from our config."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        max_position_embeddings=config.max_positions,
        hidden_activation="gelu",  # exact erf GELU in the GeGLU, as F.gelu's default
        classifier_activation="gelu",  # the head's GELU
        norm_eps=config.norm_eps,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        classifier_bias=False,  # the head's dense has no bias
        decoder_bias=True,  # the output bias
        attention_dropout=config.dropout,
        embedding_dropout=config.dropout,
        mlp_dropout=config.dropout,
        # transformers 5 takes RoPE settings as a dict per layer type; 4 reads global_rope_theta
        # and local_rope_theta (see v4_fields).
        layer_types=layer_types(config),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": float(config.global_rope_theta)},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(config.local_rope_theta)},
        },
        local_attention=config.local_window,
        tie_word_embeddings=True,
    )


def layer_types(config: ModernBertConfig) -> list[str]:
    """HF's per-layer attention kinds: block i is global when i % global_every == 0."""
    return [
        "full_attention" if i % config.global_every == 0 else "sliding_attention" for i in range(config.n_layers)
    ]


def token_ids(special_ids: dict[str, int | None]) -> dict[str, int | None]:
    """pad/bos/eos/cls/sep for the HF config. As in ModernBERT's own config (bos = cls, eos = sep),
    each of a pair stands in for the other where the tokenizer has only one: a BERT-style
    tokenizer has [CLS]/[SEP], a GPT-style one has only end-of-text."""
    bos = first_known(special_ids.get("bos"), special_ids.get("cls"))
    eos = first_known(special_ids.get("eos"), special_ids.get("sep"))
    return dict(
        pad_token_id=special_ids.get("pad"),
        bos_token_id=bos,
        eos_token_id=eos,
        cls_token_id=first_known(special_ids.get("cls"), bos),
        sep_token_id=first_known(special_ids.get("sep"), eos),
    )


def first_known(*ids: int | None) -> int | None:
    """The first id that is not None (0 is a valid id), or None."""
    return next((i for i in ids if i is not None), None)


def hf_config(config: ModernBertConfig, special_ids: dict[str, int | None]) -> transformers.ModernBertConfig:
    """The ``transformers.ModernBertConfig`` that makes ``ModernBertForMaskedLM`` compute what
    ``ModernBert`` does."""
    return transformers.ModernBertConfig(
        architectures=[HF_CLASS.__name__],
        **shared_fields(config),
        **token_ids(special_ids),
        # MLM never trains [CLS] to summarise the sequence (there is no next-sentence task), and in
        # local layers it sees only its window: a classifier fine-tuned from this export pools the
        # mean of all tokens, as ModernBERT's released checkpoints do.
        classifier_pooling="mean",
        classifier_dropout=0.0,
        sparse_prediction=False,  # logits for every position, as our model's full head
        deterministic_flash_attn=False,  # only read by the flash-attention kernel
    )


def check_causal_exportable(config: ModernBertConfig) -> None:
    """transformers 4's ModernBertDecoder gives its local layers the global RoPE theta: it can
    compute what ``ModernBertCausal`` does only where the two thetas are one."""
    if TRANSFORMERS_MAJOR < 5 and config.local_rope_theta != config.global_rope_theta:
        raise ScratchLMError(
            f"model.arch.local_rope_theta={config.local_rope_theta} differs from global_rope_theta="
            f"{config.global_rope_theta}, and transformers {transformers.__version__}'s ModernBertDecoder "
            "uses the global one in every layer, so the Hugging Face export could not reproduce this "
            "model: install transformers>=5.1, or set both thetas to one value"
        )


def causal_hf_config(
    config: ModernBertConfig, special_ids: dict[str, int | None]
) -> transformers.ModernBertDecoderConfig:
    """The ``transformers.ModernBertDecoderConfig`` that makes ``ModernBertDecoderForCausalLM``
    compute what ``ModernBertCausal`` does. Its ``local_attention`` is the same number as the
    encoder's; the decoder's window is the half of it that lies before each token."""
    ids = token_ids(special_ids)
    missing = [name for name, value in ids.items() if value is None]
    if missing:  # this config class accepts no None here
        raise ScratchLMError(
            f"modernbert-causal export needs token ids for {', '.join(missing)}; train the tokenizer "
            "with --family modernbert-causal (it adds end-of-text and padding tokens)"
        )
    return transformers.ModernBertDecoderConfig(
        architectures=[CAUSAL_HF_CLASS.__name__],
        **shared_fields(config),
        **ids,
        classifier_dropout=0.0,
        use_cache=True,
    )


def v4_fields(config: ModernBertConfig) -> dict:
    """What transformers 4 needs besides the fields of 5: RoPE's thetas under its names (5 reads
    ``rope_parameters``), and the window, which 4's decoder config does not save (it keeps only
    the half it derives, and takes the default window again when it loads)."""
    return {
        "global_rope_theta": float(config.global_rope_theta),
        "local_rope_theta": float(config.local_rope_theta),
        "local_attention": config.local_window,
    }
