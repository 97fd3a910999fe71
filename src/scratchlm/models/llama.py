"""Llama: the modern Transformer decoder (Touvron et al. 2023), trained with causal language modelling.

Pre-norm blocks (``x = x + sublayer(RMSNorm(x))``) with a final RMSNorm (Zhang & Sennrich 2019),
rotary positions applied to queries and keys in every block (Su et al. 2021), a SwiGLU MLP
(Shazeer 2020), grouped-query attention (Ainslie et al. 2023), no biases anywhere, and an LM head
that is tied to the token embedding or not (``tie_embeddings``). Exported to
``transformers.LlamaForCausalLM`` by ``scratchlm.export.llama``.

Besides the legend in ``layers.py``, G is the number of key/value heads (``n_kv_heads``).
"""

from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.models.layers import (
    GatedLinear,
    RMSNorm,
    ResidualLinear,
    attend,
    build_attention_mask,
    check_length,
    check_positive_int,
    check_shared_fields,
    count_params,
    init_normal,
    positions_in_documents,
    rope_cos_sin,
    rotary_split_heads,
)

# --- config --------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    """Sizes of a Llama model. Defaults are the ``base`` preset (~124M parameters with a tied
    50257-token vocabulary, the width and depth of GPT-2 small)."""

    vocab_size: int
    """Token vocabulary size, special tokens included; the tokenizer decides it."""
    d_model: int = 768
    """Width of the residual stream (HF: hidden_size)."""
    n_layers: int = 12
    """Number of decoder blocks."""
    n_heads: int = 12
    """Query heads per block; must divide ``d_model``, and the head width d_model/n_heads must be
    even (RoPE rotates pairs of dimensions)."""
    n_kv_heads: int = 12
    """Key/value heads per block (grouped-query attention); must divide ``n_heads``. Equal to
    ``n_heads`` is classic multi-head attention; fewer shrinks the KV cache at inference."""
    d_ff: int = 2048
    """Hidden width of each block's SwiGLU MLP (HF: intermediate_size); ~8/3·d_model keeps the
    three matrices at the cost of a 4·d_model GELU MLP (Shazeer 2020, §2)."""
    max_positions: int = 2048
    """Longest sequence the model accepts. RoPE has no position table: this is only the limit
    that is checked and exported (HF: max_position_embeddings)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies; 10000 as in RoFormer and Llama 2 (Llama 3 uses 500000 for
    long contexts)."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head. At these sizes the head is a large share of
    the parameters, so small Llamas (3.2 1B/3B) tie it; the 8B and larger ones do not."""
    dropout: float = 0.0
    """Dropout on attention probabilities (HF: attention_dropout); Llama has no other dropout and
    pre-trains with none."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon; 1e-5 as in Llama 2 and 3."""

    def __post_init__(self) -> None:
        check_shared_fields(self)
        check_positive_int(self, "n_kv_heads")
        if self.n_heads % self.n_kv_heads != 0:
            raise ScratchLMError(
                f"model.arch.n_kv_heads={self.n_kv_heads} does not divide model.arch.n_heads={self.n_heads}; "
                "each key/value head serves a whole group of query heads: choose a divisor of n_heads"
            )
        if self.head_dim % 2 != 0:
            raise ScratchLMError(
                f"model.arch.d_model={self.d_model} / model.arch.n_heads={self.n_heads} gives an odd head "
                f"width {self.head_dim}; RoPE rotates pairs of dimensions: choose an even d_model/n_heads"
            )
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 1:
            raise ScratchLMError(f"model.arch.rope_theta={self.rope_theta!r}: must be a number above 1")
        if not isinstance(self.tie_embeddings, bool):
            raise ScratchLMError(f"model.arch.tie_embeddings={self.tie_embeddings!r}: must be true or false")

    @property
    def head_dim(self) -> int:
        """K, the width of one query, key or value head."""
        return self.d_model // self.n_heads


# --- blocks --------------------------------------------------------------------------------------


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with rotary positions, where each key/value head serves a group of
    n_heads/n_kv_heads query heads (Ainslie et al. 2023); no biases.

    One fused projection makes queries, keys and values: its weight is ((H + 2G)·K, D), rows
    [0, H·K) queries, the next G·K keys, the last G·K values, each head K contiguous rows.
    ``export/llama.py`` splits it at these offsets.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.attn_dropout = config.dropout
        qkv_width = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_width, bias=False)
        self.proj = ResidualLinear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D), cos/sin (T, K) or (B, T, K) in fp32, mask from ``build_attention_mask``
        -> (B, T, D), added to ``residual`` if given (inside the output projection's matmul)."""
        B, T, _ = x_BTD.shape
        H, G, K = self.n_heads, self.n_kv_heads, self.head_dim
        # Rotated in fp32 (cos/sin are fp32, so the product promotes), then back to the compute
        # dtype: under bf16 autocast q and k would otherwise reach SDPA in fp32 and v in bf16.
        q_BHTK, k_BGTK, v_BGTK = rotary_split_heads(self.qkv(x_BTD).view(B, T, H + 2 * G, K), cos, sin, [H, G, G])
        y_BHTK = attend(
            q_BHTK,
            k_BGTK,
            v_BGTK,
            mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            causal=True,
            # Each key/value head is shared across its query group without copying it. Asked
            # only when G < H: with G == H it changes nothing, and fewer kernels accept the flag.
            enable_gqa=G < H,
        )
        y_BTD = y_BHTK.transpose(1, 2).reshape(B, T, H * K)  # (B, T, H, K) -> (B, T, D)
        return self.proj(y_BTD, residual=residual)


class SwiGLU(nn.Module):
    """Gated MLP ``proj(silu(gate(x)) * up(x))`` (Shazeer 2020, eq. for FFN_SwiGLU), no biases.

    Gate and up are one fused (2F, D) weight, one matmul instead of two: rows [0, F) are the gate,
    rows [F, 2F) the up projection. ``export/llama.py`` splits it there.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_up = GatedLinear(d_model, d_ff, activation="silu")  # silu(gate) * up
        self.proj = ResidualLinear(d_ff, d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), added to ``residual`` if given (inside the last matmul)."""
        return self.proj(self.gate_up(x_BTD), residual=residual)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: ``x = x + Attn(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = GroupedQueryAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)

    def forward(
        self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x_BTD = self.attn(self.attn_norm(x_BTD), cos, sin, mask, residual=x_BTD)
        return self.mlp(self.mlp_norm(x_BTD), residual=x_BTD)


# --- model ---------------------------------------------------------------------------------------


class Llama(nn.Module):
    """Llama decoder with its LM head (tied to the token embedding unless ``tie_embeddings`` is
    false, then a separate bias-free ``head``).

    ``forward`` returns hidden states after the final RMSNorm; ``logits`` projects any of them onto
    the vocabulary. The rotary cosines and sines are computed on every forward, not cached in a
    buffer: DDP broadcasts buffers on every forward, and they cost one small outer product (done
    outside a compiled graph: ``layers.rope_cos_sin``).
    """

    is_causal = True

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        # Tied: no head module at all, so the shared matrix appears once in the state dict.
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights (as HF's Llama init) and unit RMSNorms; the two projections that
        write into the residual stream in each block get std 0.02/sqrt(2·n_layers), so the
        stream's variance does not grow with depth (GPT-2 paper, §2.3; 2 such writes per block)."""
        init_normal(self, std=0.02)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
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
        """Hidden states after the final RMSNorm.

        Args:
            input_ids: (B, T) token ids, T <= ``config.max_positions``.
            attention_mask: (B, T) bool or 0/1, False/0 at padding; None when nothing is padded
                (then SDPA runs its fused causal kernel). Padding is expected on the right: without
                ``doc_ids`` the positions are 0..T-1 whatever the mask says.
            doc_ids: (B, T) document id per token, -1 at padding, documents as contiguous runs.
                Attention stays inside each packed document, and rotary positions restart at 0 at
                each document's first token, so a document computes exactly what it would alone.
                (``LlamaForCausalLM`` computes the same given ``position_ids`` that restart this
                way, no ``attention_mask`` and ``use_cache=False``: it then derives the document
                mask from the restarts.)

        Returns:
            (B, T, D) hidden states; position t depends on tokens 0..t only.
        """
        T = input_ids.shape[1]
        check_length(T, self.config.max_positions)
        if doc_ids is None:
            positions = torch.arange(T, device=input_ids.device)  # (T,)
        else:
            positions = positions_in_documents(doc_ids)  # (B, T)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)  # (..., T, K)
        mask = build_attention_mask(attention_mask, causal=True, doc_ids=doc_ids, flex=True)
        x_BTD = self.tok_emb(input_ids)
        for block in self.blocks:
            x_BTD = block(x_BTD, cos, sin, mask)
        return self.final_norm(x_BTD)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) for hidden states (..., D), through the head or the tied
        token embedding."""
        return F.linear(*self.vocab_projection(hidden))

    def vocab_projection(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features, weight, bias) such that ``logits = F.linear(features, weight, bias)``: the
        head up to its vocabulary matmul, which a fused loss runs with the cross-entropy."""
        return hidden, self.tok_emb.weight if self.head is None else self.head.weight, None

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied head once. ``exclude_embeddings`` leaves out the token table;
        an untied head stays counted: unlike a table lookup it is a matmul every token pays for."""
        return count_params(self, exclude_embeddings)


# --- presets -------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_positions=512),
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1376, max_positions=1024),
    "base": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, max_positions=2048),
}
"""Named sizes, all with a tied head. d_ff is 8/3·d_model rounded up to a multiple of 32. ``small``
has ~31.6M parameters with a 16384-token vocabulary (23.2M without the embedding); ``base`` has
GPT-2 small's width, depth and heads, ~123.6M parameters with GPT-2's 50257-token vocabulary."""
