"""BERT: the classic Transformer encoder (Devlin et al. 2019), trained with masked language modelling.

Post-LN blocks (``x = LN(x + sublayer(x))``), learned absolute positions, token-type embeddings,
exact (erf) GELU, biases everywhere, a LayerNorm on the embeddings, and an MLM head (dense, GELU,
LayerNorm, then a decoder tied to the word embeddings plus an output bias). Exported to
``transformers.BertForMaskedLM`` by ``scratchlm.export.bert``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.models.layers import (
    Dropout,
    PostNormEncoderBlock,
    build_attention_mask,
    check_length,
    check_positive_int,
    check_shared_fields,
    count_params,
    init_normal,
)

# --- config --------------------------------------------------------------------------------------


@dataclass
class BertConfig:
    """Sizes of a BERT model. Defaults are BERT-base (Devlin et al. 2019, §3)."""

    vocab_size: int
    """Token vocabulary size, special tokens included; the tokenizer decides it."""
    d_model: int = 768
    """Width of the residual stream (HF: hidden_size)."""
    n_layers: int = 12
    """Number of encoder blocks."""
    n_heads: int = 12
    """Attention heads per block; must divide ``d_model``."""
    d_ff: int = 3072
    """Hidden width of each block's MLP (HF: intermediate_size)."""
    max_positions: int = 512
    """Length of the learned position table: the longest sequence the model accepts."""
    type_vocab_size: int = 2
    """Number of token types (segments A/B in the original sentence-pair inputs)."""
    dropout: float = 0.1
    """Dropout on embeddings, attention probabilities and each sublayer's output."""
    norm_eps: float = 1e-12
    """LayerNorm epsilon; 1e-12 as in the original BERT."""

    def __post_init__(self) -> None:
        check_shared_fields(self)
        check_positive_int(self, "type_vocab_size")


# --- blocks --------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_positions, config.d_model)
        self.type_emb = nn.Embedding(config.type_vocab_size, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, input_ids_BT: torch.Tensor, token_type_ids_BT: torch.Tensor | None) -> torch.Tensor:
        T = input_ids_BT.shape[1]
        positions_T = torch.arange(T, device=input_ids_BT.device)  # no buffer: see Bert's docstring
        x_BTD = self.tok_emb(input_ids_BT) + self.pos_emb(positions_T)
        if token_type_ids_BT is None:
            x_BTD = x_BTD + self.type_emb.weight[0]  # every token is type 0: skip the gather
        else:
            x_BTD = x_BTD + self.type_emb(token_type_ids_BT)
        return self.dropout(self.norm(x_BTD))


class BertMLMHead(nn.Module):
    """The transform before the tied decoder: dense, GELU, LayerNorm; plus the decoder's bias.

    The decoder matrix itself is the word embedding table, owned by :class:`BertEmbeddings`.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_ND: torch.Tensor, decoder_VD: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden_ND), decoder_VD, self.bias)

    def transform(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden_ND)))


# --- model ---------------------------------------------------------------------------------------


class Bert(nn.Module):
    """BERT encoder with its MLM head.

    ``forward`` returns the last block's hidden states; ``logits`` applies the MLM head to any
    subset of them. Position ids are computed on the fly rather than kept in a buffer: DDP
    broadcasts buffers on every forward, and a constant needs no broadcasting.
    """

    is_causal = False
    takes_positions = True
    """``forward`` can compute hidden states at chosen positions only (see ``positions``)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.blocks = nn.ModuleList(PostNormEncoderBlock(config) for _ in range(config.n_layers))
        self.head = BertMLMHead(config)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights, zero biases (the MLM output bias too), unit LayerNorms, as in
        the original BERT (its ``initializer_range``)."""
        init_normal(self, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the last block.

        Args:
            input_ids: (B, T) token ids, T <= ``config.max_positions``.
            attention_mask: (B, T) bool or 0/1, False/0 at padding; None when nothing is padded.
                Real tokens never attend to padding.
            token_type_ids: (B, T) segment ids; None means all zeros.
            doc_ids: (B, T) document id per token, -1 at padding; keeps attention inside each
                packed document (see :func:`~scratchlm.models.layers.build_attention_mask`).
            positions: (B, Q) the only positions whose hidden states are wanted (the masked
                ones, for MLM): the last block then computes queries, residuals and MLP there
                alone, keys and values everywhere. The result equals those rows of the full
                output; the last block costs about Q/T of itself.

        Returns:
            (B, T, D) hidden states, or (B, Q, D) at ``positions``.
        """
        check_length(input_ids.shape[1], self.config.max_positions)
        mask = build_attention_mask(attention_mask, causal=False, doc_ids=doc_ids, flex=True)
        x_BTD = self.embeddings(input_ids, token_type_ids)
        for block in self.blocks[:-1]:
            x_BTD = block(x_BTD, mask)
        return self.blocks[-1](x_BTD, mask, positions)

    def tail_params(self) -> int:
        """Parameters of the last block that run only at ``positions`` when given: all but the
        key and value projections, which every position still needs."""
        D = self.config.d_model
        return sum(p.numel() for p in self.blocks[-1].parameters()) - 2 * (D * D + D)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits (..., V) for hidden states (..., D): any positions, e.g. only masked ones."""
        return F.linear(*self.vocab_projection(hidden))

    def vocab_projection(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features, weight, bias) such that ``logits = F.linear(features, weight, bias)``: the
        head up to its vocabulary matmul, which a fused loss runs with the cross-entropy."""
        return self.head.transform(hidden), self.embeddings.tok_emb.weight, self.head.bias

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied tensors once; ``exclude_embeddings`` leaves out the word,
        position and token-type tables."""
        return count_params(self, exclude_embeddings)


# --- presets -------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_positions=256),
    "small": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, max_positions=512),
    "base": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_positions=512),
}
"""Named sizes. ``base`` is BERT-base (110M parameters with its 30522-token vocabulary)."""
