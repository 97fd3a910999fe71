"""BERT -> ``transformers.BertForMaskedLM``: the name map, the weight conversion and the HF config."""

import torch
import transformers

from scratchlm.models.bert import Bert, BertConfig

HF_CLASS = transformers.BertForMaskedLM
AUTO_CLASS = transformers.AutoModelForMaskedLM

EMBEDDINGS_AND_HEAD: dict[str, str] = {
    "embeddings.tok_emb.weight": "bert.embeddings.word_embeddings.weight",
    "embeddings.pos_emb.weight": "bert.embeddings.position_embeddings.weight",
    "embeddings.type_emb.weight": "bert.embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "bert.embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "bert.embeddings.LayerNorm.bias",
    "head.dense.weight": "cls.predictions.transform.dense.weight",
    "head.dense.bias": "cls.predictions.transform.dense.bias",
    "head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "head.bias": "cls.predictions.bias",
}
"""Our name -> HF name, outside the blocks. The decoder weight (``cls.predictions.decoder.weight``)
is the word embedding table and its bias is ``cls.predictions.bias``: HF ties both on load, so
each is written once."""

BLOCK: dict[str, str | tuple[str, str, str]] = {
    "attn.qkv.weight": ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight"),
    "attn.qkv.bias": ("attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias"),
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "attn_norm.weight": "attention.output.LayerNorm.weight",
    "attn_norm.bias": "attention.output.LayerNorm.bias",
    "mlp.fc.weight": "intermediate.dense.weight",
    "mlp.fc.bias": "intermediate.dense.bias",
    "mlp.proj.weight": "output.dense.weight",
    "mlp.proj.bias": "output.dense.bias",
    "mlp_norm.weight": "output.LayerNorm.weight",
    "mlp_norm.bias": "output.LayerNorm.bias",
}
"""Our name under ``blocks.{i}.`` -> HF name under ``bert.encoder.layer.{i}.``. A tuple means our
fused QKV tensor is split along its output rows into query, key and value (in that order)."""


def name_map(n_layers: int) -> dict[str, str | tuple[str, ...]]:
    """Every parameter of a ``Bert`` with ``n_layers`` blocks -> its HF name(s)."""
    names: dict[str, str | tuple[str, ...]] = dict(EMBEDDINGS_AND_HEAD)
    for i in range(n_layers):
        for ours, theirs in BLOCK.items():
            prefix = f"bert.encoder.layer.{i}."
            names[f"blocks.{i}.{ours}"] = (
                tuple(prefix + t for t in theirs) if isinstance(theirs, tuple) else prefix + theirs
            )
    return names


def hf_state_dict(model: Bert) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under ``BertForMaskedLM``'s names, plus the pooler (see below)."""
    ours = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for name, target in name_map(model.config.n_layers).items():
        tensor = ours.pop(name)
        if isinstance(target, tuple):
            out.update(zip(target, tensor.chunk(3, dim=0)))  # (3D, ...) -> 3 x (D, ...)
        else:
            out[target] = tensor
    if ours:
        raise AssertionError(f"bert parameters missing from the export name map: {sorted(ours)}")
    out.update(pooler_weights(model.config))
    return out


def pooler_weights(config: BertConfig) -> dict[str, torch.Tensor]:
    """An identity pooler: ``pooled = tanh(h_[CLS])``.

    MLM never trains BERT's pooler (the original trained it with next-sentence prediction, which
    we leave out, as RoBERTa does). Without these weights ``BertForSequenceClassification`` would
    draw a random pooler and say so in its load report; with an identity dense and zero bias the
    classifier starts from the [CLS] hidden state itself, squashed by tanh. The cost is that
    ``BertForMaskedLM``, which has no pooler, lists these two keys as UNEXPECTED when loading,
    just as it does for Google's own BERT checkpoints.
    """
    return {
        "bert.pooler.dense.weight": torch.eye(config.d_model),
        "bert.pooler.dense.bias": torch.zeros(config.d_model),
    }


def hf_config(config: BertConfig, special_ids: dict[str, int | None]) -> transformers.BertConfig:
    """The ``transformers.BertConfig`` that makes ``BertForMaskedLM`` compute what ``Bert`` does."""
    return transformers.BertConfig(
        architectures=[HF_CLASS.__name__],
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=config.d_ff,
        hidden_act="gelu",  # exact erf GELU, as models.bert uses
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        max_position_embeddings=config.max_positions,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.norm_eps,
        pad_token_id=special_ids.get("pad"),
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        tie_word_embeddings=True,
    )
