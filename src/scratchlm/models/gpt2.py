"""GPT-2: the classic Transformer decoder (Radford et al. 2019), trained with causal language modelling.

Pre-LN blocks (``x = x + sublayer(LN(x))``) with a final LayerNorm, learned absolute positions,
tanh-approximated GELU, biases, and an LM head tied to the token embedding. Residual projections
start smaller, at 0.02/sqrt(2·n_layers) (GPT-2 paper, §2.3). Exported to
``transformers.GPT2LMHeadModel`` by ``scratchlm.export.gpt2``.
"""

from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.models.layers import (
    Dropout,
    MLP,
    SelfAttention,
    build_attention_mask,
    check_length,
    check_shared_fields,
    count_params,
    init_normal,
)

# --- config --------------------------------------------------------------------------------------


@dataclass
class GPT2Config:
    """Sizes of a GPT-2 model. Defaults are GPT-2 small (124M parameters), the ``base`` preset."""

    vocab_size: int
    """Token vocabulary size, special tokens included; the tokenizer decides it."""
    d_model: int = 768
    """Width of the residual stream (HF: n_embd)."""
    n_layers: int = 12
    """Number of decoder blocks."""
    n_heads: int = 12
    """Attention heads per block; must divide ``d_model``."""
    d_ff: int = 3072
    """Hidden width of each block's MLP (HF: n_inner)."""
    max_positions: int = 1024
    """Length of the learned position table: the longest sequence the model accepts."""
    dropout: float = 0.1
    """Dropout on embeddings, attention probabilities and each sublayer's output."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        check_shared_fields(self)


# --- blocks --------------------------------------------------------------------------------------


class GPT2Block(nn.Module):
    """Pre-LN decoder block: ``x = x + Attn(LN(x)); x = x + MLP(LN(x))``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attn = SelfAttention(config.d_model, config.n_heads, config.dropout, causal=True)
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config.d_model, config.d_ff, config.dropout, gelu="tanh")

    def forward(self, x_BTD: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x_BTD = self.attn(self.attn_norm(x_BTD), mask, residual=x_BTD)
        return self.mlp(self.mlp_norm(x_BTD), residual=x_BTD)


# --- model ---------------------------------------------------------------------------------------


class GPT2(nn.Module):
    """GPT-2 decoder with its tied LM head.

    ``forward`` returns hidden states after the final LayerNorm; ``logits`` projects any of them
    onto the vocabulary with the token embedding matrix. Position ids are computed on the fly
    rather than kept in a buffer: DDP broadcasts buffers on every forward.
    """

    is_causal = True

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_positions, config.d_model)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(GPT2Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights, zero biases, unit LayerNorms; the two projections that write
        into the residual stream in each block get std 0.02/sqrt(2·n_layers), so the stream's
        variance does not grow with depth (GPT-2 paper, §2.3; 2 such writes per block)."""
        init_normal(self, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final LayerNorm.

        Args:
            input_ids: (B, T) token ids, T <= ``config.max_positions``.
            attention_mask: (B, T) bool or 0/1, False/0 at padding; None when nothing is padded
                (then SDPA runs its fused causal kernel). Padding is expected on the right: the
                positions are 0..T-1 whatever the mask says.
            doc_ids: (B, T) document id per token, -1 at padding; keeps attention inside each
                packed document (see :func:`~scratchlm.models.layers.build_attention_mask`).

        Returns:
            (B, T, D) hidden states; position t depends on tokens 0..t only.
        """
        T = input_ids.shape[1]
        check_length(T, self.config.max_positions)
        mask = build_attention_mask(attention_mask, causal=True, doc_ids=doc_ids, flex=True)
        positions_T = torch.arange(T, device=input_ids.device)
        x_BTD = self.dropout(self.tok_emb(input_ids) + self.pos_emb(positions_T))
        for block in self.blocks:
            x_BTD = block(x_BTD, mask)
        return self.final_norm(x_BTD)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) for hidden states (..., D), through the tied embedding."""
        return F.linear(*self.vocab_projection(hidden))

    def vocab_projection(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features, weight, bias) such that ``logits = F.linear(features, weight, bias)``: the
        head up to its vocabulary matmul, which a fused loss runs with the cross-entropy."""
        return hidden, self.tok_emb.weight, None

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, the tied head once; ``exclude_embeddings`` leaves out the token and
        position tables."""
        return count_params(self, exclude_embeddings)


# --- presets -------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_positions=256),
    "small": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, max_positions=512),
    "base": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_positions=1024),
}
"""Named sizes. ``base`` is GPT-2 small (124M parameters with its 50257-token vocabulary)."""
