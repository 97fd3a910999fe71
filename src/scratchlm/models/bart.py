"""BART: a Transformer encoder-decoder pre-trained as a denoising autoencoder (Lewis et al. 2020).

Post-LN blocks (``x = LN(x + sublayer(x))``) in both stacks, learned absolute positions, a
LayerNorm on the embeddings of each stack, exact (erf) GELU and biases everywhere. One token
embedding matrix serves the encoder, the decoder and the LM head; embeddings are not scaled by
sqrt(D) (``scale_embedding=False`` in HF terms, as in BART-base and BART-large). The decoder's
self-attention is causal and each decoder block also attends to the encoder's output. Exported to
``transformers.BartForConditionalGeneration`` by ``scratchlm.export.bart``.

Shapes: S is the encoder length and T the decoder length (see the legend in ``models/layers.py``).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.models.layers import (
    MLP,
    Dropout,
    HeadsLinear,
    PostNormEncoderBlock,
    SelfAttention,
    build_attention_mask,
    check_length,
    check_positive_int,
    check_shared_fields,
    count_params,
    init_normal,
    sdpa,
)

# --- config --------------------------------------------------------------------------------------


@dataclass
class BartConfig:
    """Sizes of a BART model. Defaults are BART-base (Lewis et al. 2020, §3; 140M parameters)."""

    vocab_size: int
    """Token vocabulary size, special tokens included; the tokenizer decides it."""
    d_model: int = 768
    """Width of the residual stream in both stacks."""
    n_layers: int = 6
    """Number of encoder blocks."""
    n_decoder_layers: int | None = None
    """Number of decoder blocks; unset means as many as ``n_layers``."""
    n_heads: int = 12
    """Attention heads of every attention layer; must divide ``d_model``."""
    d_ff: int = 3072
    """Hidden width of each block's MLP (HF: encoder_ffn_dim and decoder_ffn_dim)."""
    max_positions: int = 1024
    """Length of each stack's learned position table: the longest input, and the longest target."""
    dropout: float = 0.1
    """Dropout on embeddings, attention probabilities and each sublayer's output."""

    norm_eps: ClassVar[float] = 1e-5
    """LayerNorm epsilon: fixed, because ``transformers.BartConfig`` has no field for it and its
    LayerNorms keep PyTorch's default."""

    def __post_init__(self) -> None:
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        check_shared_fields(self)
        check_positive_int(self, "n_decoder_layers")


# --- blocks --------------------------------------------------------------------------------------


class BartEmbeddings(nn.Module):
    """Token embedding (the shared table, passed in) + this stack's learned positions, then
    LayerNorm and dropout."""

    def __init__(self, config: BartConfig) -> None:
        super().__init__()
        self.pos_emb = nn.Embedding(config.max_positions, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, tokens_BTD: torch.Tensor) -> torch.Tensor:
        positions_T = torch.arange(tokens_BTD.shape[1], device=tokens_BTD.device)  # no buffer: DDP
        return self.dropout(self.norm(tokens_BTD + self.pos_emb(positions_T)))


class CrossAttention(nn.Module):
    """Multi-head attention of decoder queries over encoder keys and values.

    Keys and values come from one fused projection of the encoder output, weight (2D, D): rows
    [0, D) make keys, [D, 2D) values, heads contiguous in each. ``export/`` relies on this layout.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = HeadsLinear(d_model, [n_heads] * 2, d_model // n_heads)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor, memory_BSD: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D) queries, memory (B, S, D) encoder output, mask (B, 1, 1, S) bool -> (B, T, D)."""
        B, T, D = x_BTD.shape
        H = self.n_heads
        q_BHTK = self.q(x_BTD).view(B, T, H, D // H).transpose(1, 2)
        k_BHSK, v_BHSK = self.kv(memory_BSD)
        y_BHTK = sdpa(
            q_BHTK, k_BHSK, v_BHSK, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y_BTD = y_BHTK.transpose(1, 2).reshape(B, T, D)  # (B, T, H, K) -> (B, T, D)
        return self.resid_dropout(self.proj(y_BTD))


class DecoderBlock(nn.Module):
    """Post-LN decoder block: causal self-attention, cross-attention, MLP, each followed by
    ``x = LN(x + sublayer(x))``."""

    def __init__(self, config: BartConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config.d_model, config.n_heads, config.dropout, causal=True)
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.cross_attn = CrossAttention(config.d_model, config.n_heads, config.dropout)
        self.cross_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config.d_model, config.d_ff, config.dropout, gelu="none")
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        self_mask: torch.Tensor | None,
        memory_BSD: torch.Tensor,
        cross_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x_BTD = self.attn_norm(self.attn(x_BTD, self_mask, residual=x_BTD))
        x_BTD = self.cross_norm(x_BTD + self.cross_attn(x_BTD, memory_BSD, cross_mask))
        return self.mlp_norm(self.mlp(x_BTD, residual=x_BTD))


# --- model ---------------------------------------------------------------------------------------


class Bart(nn.Module):
    """BART encoder-decoder with its tied LM head.

    ``encode`` and ``decode`` return hidden states of the last block of each stack; ``logits``
    projects decoder states onto the vocabulary with the shared token embedding plus a fixed
    output bias, ``logit_bias`` (HF's ``final_logits_bias`` buffer; see :meth:`fit_logit_bias`).
    The decoder's first input is the decoder
    start token, which is not part of the model: the objective and the exporter take it from the
    tokenizer (BART uses its end-of-text token, as HF's configs expect).
    """

    is_causal = False
    is_encoder_decoder = True

    def __init__(self, config: BartConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder_embeddings = BartEmbeddings(config)
        self.encoder_blocks = nn.ModuleList(PostNormEncoderBlock(config) for _ in range(config.n_layers))
        self.decoder_embeddings = BartEmbeddings(config)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_decoder_layers))
        self.register_buffer("logit_bias", torch.zeros(config.vocab_size))
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights, zero biases and unit LayerNorms (HF BART's ``init_std``)."""
        init_normal(self, std=0.02)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder hidden states (B, S, D) of ``input_ids`` (B, S), S <= ``config.max_positions``.

        ``attention_mask`` (B, S) bool or 0/1 is False at padding, None when nothing is padded;
        real tokens never attend to padding."""
        check_length(input_ids.shape[1], self.config.max_positions)
        mask = build_attention_mask(attention_mask, causal=False)
        x_BSD = self.encoder_embeddings(self.tok_emb(input_ids))
        for block in self.encoder_blocks:
            x_BSD = block(x_BSD, mask)
        return x_BSD

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder hidden states (B, T, D).

        Args:
            decoder_input_ids: (B, T) the targets shifted right behind the decoder start token.
            encoder_hidden: (B, S, D) from :meth:`encode`.
            encoder_mask: (B, S) False at encoder padding, which cross-attention skips; None
                when nothing is padded.
            decoder_attention_mask: (B, T) False at decoder padding; None when nothing is padded.
                Position t attends to decoder positions <= t either way.
        """
        check_length(decoder_input_ids.shape[1], self.config.max_positions)
        self_mask = build_attention_mask(decoder_attention_mask, causal=True)
        cross_mask = None if encoder_mask is None else encoder_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        x_BTD = self.decoder_embeddings(self.tok_emb(decoder_input_ids))
        for block in self.decoder_blocks:
            x_BTD = block(x_BTD, self_mask, encoder_hidden, cross_mask)
        return x_BTD

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder hidden states (B, T, D): ``decode(encode(input_ids, attention_mask), ...)``."""
        encoder_hidden = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits (..., V) for decoder hidden states (..., D), through the shared embedding."""
        return F.linear(*self.vocab_projection(hidden))

    def vocab_projection(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features, weight, bias) such that ``logits = F.linear(features, weight, bias)``: the
        head up to its vocabulary matmul, which a fused loss runs with the cross-entropy."""
        return hidden, self.tok_emb.weight, self.logit_bias

    @torch.no_grad()
    def fit_logit_bias(self, labels: torch.Tensor) -> None:
        """Set the output bias to the log unigram frequencies of ``labels`` (-100 skipped, add-one
        smoothed), once, before training: the model then starts out knowing how common each
        token is. Without it a small BART learns that first by collapsing its encoder to one
        constant vector, which cross-attention passes on as the missing bias, and never uses
        the encoder again (its tied head, read through a LayerNorm, has no other cheap way to
        shift all logits). A buffer, not a parameter, as HF's ``final_logits_bias``."""
        counts = torch.bincount(labels[labels >= 0], minlength=self.config.vocab_size).to(self.logit_bias)
        self.logit_bias.copy_((counts + 1).log() - (counts + 1).sum().log())

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, the shared token table once; ``exclude_embeddings`` leaves out it and
        both position tables."""
        return count_params(self, exclude_embeddings)


# --- presets -------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_positions=256),
    "small": dict(d_model=512, n_layers=6, n_heads=8, d_ff=2048, max_positions=512),
    "base": dict(d_model=768, n_layers=6, n_heads=12, d_ff=3072, max_positions=1024),
}
"""Named sizes, as many decoder blocks as encoder blocks (so ``arch: {n_layers: 2}`` shrinks both).
``base`` is BART-base (140M parameters with its 50265-token vocabulary)."""
