"""ModernBERT: the modern Transformer encoder (Warner et al. 2024, arXiv:2412.13663), and its causal twin.

Pre-norm blocks (``x = x + sublayer(LN(x))``) with LayerNorms that have no bias, a LayerNorm on
the token embeddings (there is no position table), rotary positions (Su et al. 2021) with one base
for global layers and another for local ones, a GeGLU MLP (Shazeer 2020), a fused QKV projection,
no biases in the blocks, and attention that alternates between global and local: every
``global_every``-th block (the first included) attends over the whole sequence, the others within
a sliding window ("Modern Transformer" and "Efficiency Improvements" in §2.1 of the paper). The
head is ModernBERT's: dense, GELU, LayerNorm, then a decoder tied to the token embedding, plus an
output bias, the one bias of the model (the paper keeps it to offset weight tying).

One backbone, two families:

- ``modernbert`` (:class:`ModernBert`): bidirectional, trained with MLM; exported to
  ``transformers.ModernBertForMaskedLM``.
- ``modernbert-causal`` (:class:`ModernBertCausal`): the same blocks and head with causal attention,
  trained with causal LM; exported to ``transformers.ModernBertDecoderForCausalLM``.

They differ only in two class-level facts, so ``forward`` has no branch on the mode: ``is_causal``
and :meth:`ModernBert.window_band`, the shape of the local window. The export is
``scratchlm.export.modernbert``.
"""

from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.models.layers import (
    Dropout,
    GatedLinear,
    apply_rope,
    build_attention_mask,
    check_length,
    check_positive_int,
    check_shared_fields,
    count_params,
    gather_positions,
    mask_rows,
    positions_in_documents,
    rope_cos_sin,
    rotary_split_heads,
    sdpa,
    split_heads,
)

# --- config --------------------------------------------------------------------------------------


@dataclass
class ModernBertConfig:
    """Sizes of a ModernBERT model, encoder or causal twin. Defaults are ModernBERT-base (149M
    parameters with its 50368-token vocabulary), the ``base`` preset."""

    vocab_size: int
    """Token vocabulary size, special tokens included; the tokenizer decides it."""
    d_model: int = 768
    """Width of the residual stream (HF: hidden_size)."""
    n_layers: int = 22
    """Number of blocks."""
    n_heads: int = 12
    """Attention heads per block; must divide ``d_model``, and the head width d_model/n_heads must
    be even (RoPE rotates pairs of dimensions)."""
    d_ff: int = 1152
    """Hidden width F of each block's GeGLU MLP (HF: intermediate_size); its input projection
    makes 2F values, the GELU branch and the gate."""
    max_positions: int = 8192
    """Longest sequence the model accepts. RoPE has no position table: this is only the limit
    that is checked and exported (HF: max_position_embeddings)."""
    global_every: int = 3
    """Block i attends globally when i % global_every == 0, else within the local window; 3 as in
    ModernBERT (HF: layer_types, formerly global_attn_every_n_layers). 1 makes every block global."""
    local_window: int = 128
    """Local attention window in tokens, as HF's ``local_attention``; even. The encoder lets a
    token see local_window/2 tokens on each side of it; the causal twin lets it see itself and the
    local_window/2 - 1 tokens before it (HF's ModernBertDecoder convention)."""
    global_rope_theta: float = 160_000.0
    """RoPE base of the global blocks; 160000 in ModernBERT, whose global layers read 8192 tokens."""
    local_rope_theta: float = 10_000.0
    """RoPE base of the local blocks; 10000 as in RoFormer, enough for the window's distances."""
    dropout: float = 0.0
    """Dropout after the embedding norm, on attention probabilities, after each attention output
    and inside each MLP; ModernBERT pre-trains with none."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        check_shared_fields(self)
        check_positive_int(self, "global_every")
        check_positive_int(self, "local_window")
        if self.local_window % 2 != 0:
            raise ScratchLMError(
                f"model.arch.local_window={self.local_window}: must be even (it is split into two "
                "halves around each token); choose e.g. 128"
            )
        if self.head_dim % 2 != 0:
            raise ScratchLMError(
                f"model.arch.d_model={self.d_model} / model.arch.n_heads={self.n_heads} gives an odd head "
                f"width {self.head_dim}; RoPE rotates pairs of dimensions: choose an even d_model/n_heads"
            )
        for name in ("global_rope_theta", "local_rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 1:
                raise ScratchLMError(f"model.arch.{name}={value!r}: must be a number above 1")

    @property
    def head_dim(self) -> int:
        """K, the width of one attention head."""
        return self.d_model // self.n_heads


# --- blocks --------------------------------------------------------------------------------------


def layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    """ModernBERT's LayerNorm: a scale and no bias (the paper removes biases from every norm and
    from every linear layer but the decoder, to spend the parameters in the matrices)."""
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=False)


class RotaryAttention(nn.Module):
    """Multi-head self-attention with rotary positions and one fused, bias-free QKV projection.

    The fused weight is (3D, D): rows [0, D) make queries, [D, 2D) keys, [2D, 3D) values, and
    within each the H heads lie one after another (K rows each). ``export/`` relies on this layout.
    """

    def __init__(self, config: ModernBertConfig, causal: bool) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.causal = causal
        self.attn_dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.resid_dropout = Dropout(config.dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        mask: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D), mask (B, 1, T, T) or (T, T) bool or None, cos/sin (T, K) or (B, T, K) in
        fp32 -> (B, T, D); or (B, Q, D) at the positions ``queries`` (B, Q) only, keys and values
        still from every position (bidirectional attention only)."""
        B, T, D = x_BTD.shape
        H = self.n_heads
        # Queries and keys are rotated in fp32, then back to the compute dtype (as HF does): under
        # bf16 autocast q and k would otherwise reach SDPA in fp32 and v in bf16.
        if queries is None:
            packed_BTNK = self.qkv(x_BTD).view(B, T, 3 * H, D // H)
            q_BHQK, k_BHTK, v_BHTK = rotary_split_heads(packed_BTNK, cos, sin, [H, H, H])
        else:
            if self.causal:
                raise ValueError("queries at chosen positions are for bidirectional attention only")
            w_q, w_kv = self.qkv.weight.split([D, 2 * D])
            q_BHQK = F.linear(gather_positions(x_BTD, queries), w_q).view(B, -1, H, D // H).transpose(1, 2)
            k_BHTK, v_BHTK = split_heads(F.linear(x_BTD, w_kv).view(B, T, 2 * H, D // H), H)
            cos_q, sin_q = (t[queries] if t.dim() == 2 else gather_positions(t, queries) for t in (cos, sin))
            mask = mask_rows(mask, queries)
            q_BHQK = apply_rope(q_BHQK.float(), cos_q, sin_q).to(v_BHTK.dtype)
            k_BHTK = apply_rope(k_BHTK.float(), cos, sin).to(v_BHTK.dtype)
        y_BHQK = sdpa(
            q_BHQK,
            k_BHTK,
            v_BHTK,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,  # an explicit mask already holds causality
        )
        y_BQD = y_BHQK.transpose(1, 2).reshape(B, -1, D)  # (B, Q, H, K) -> (B, Q, D)
        return self.resid_dropout(self.proj(y_BQD))


class GeGLU(nn.Module):
    """Gated MLP ``proj(GELU(a) * b)`` with ``a, b`` from one fused projection (Shazeer 2020, eq.
    for FFN_GEGLU), no biases; exact (erf) GELU.

    The fused weight is (2F, D): rows [0, F) make ``a``, the branch through GELU, rows [F, 2F) the
    gate ``b``. This is HF ModernBERT's ``Wi`` layout, so it exports unsplit.
    """

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.fc = GatedLinear(config.d_model, config.d_ff, activation="gelu")  # gelu(a) * gate
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = Dropout(config.dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(self.fc(x_BTD)))


class ModernBertBlock(nn.Module):
    """Pre-norm block: ``x = x + Attn(LN(x)); x = x + GeGLU(LN(x))``, attending globally or locally.

    Block 0 has no attention norm: its input is the embedding LayerNorm's output, already
    normalised, so ModernBERT (and HF's port) leaves the second norm out.
    """

    def __init__(self, config: ModernBertConfig, index: int, causal: bool) -> None:
        super().__init__()
        self.is_global = index % config.global_every == 0
        self.attn_norm = nn.Identity() if index == 0 else layer_norm(config)
        self.attn = RotaryAttention(config, causal)
        self.mlp_norm = layer_norm(config)
        self.mlp = GeGLU(config)

    def forward(
        self,
        x_BTD: torch.Tensor,
        mask: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), or (B, Q, D) at the positions ``queries`` (B, Q) only."""
        attended = self.attn(self.attn_norm(x_BTD), mask, cos, sin, queries)
        if queries is not None:
            x_BTD = gather_positions(x_BTD, queries)
        x_BTD = x_BTD + attended
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class ModernBertHead(nn.Module):
    """The transform before the tied decoder: dense (no bias), GELU, LayerNorm (no bias); plus the
    decoder's output bias. The decoder matrix itself is the token embedding table."""

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model, bias=False)
        self.norm = layer_norm(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_ND: torch.Tensor, decoder_VD: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden_ND), decoder_VD, self.bias)

    def transform(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden_ND)))


def local_mask(global_mask: torch.Tensor | None, band: torch.Tensor | None) -> torch.Tensor | None:
    """The mask of the local blocks: the global mask (padding, documents) narrowed to the window
    ``band`` (T, T); None when neither restricts anything."""
    if band is None:
        return global_mask
    if global_mask is None:
        return band  # (T, T), broadcast over batch and heads
    return global_mask & band  # (B, 1, T, T)


# --- model ---------------------------------------------------------------------------------------


class ModernBert(nn.Module):
    """ModernBERT encoder with its MLM head.

    ``forward`` returns hidden states after the final LayerNorm; ``logits`` applies the head to any
    subset of them. Rotary cosines and sines are computed on every forward, not kept in buffers:
    DDP broadcasts buffers on every forward, and they cost one small outer product.
    """

    is_causal = False
    takes_positions = True
    """``forward`` can compute hidden states at chosen positions only (see ``positions``)."""

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.emb_norm = layer_norm(config)
        self.emb_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(ModernBertBlock(config, i, self.is_causal) for i in range(config.n_layers))
        self.final_norm = layer_norm(config)
        self.head = ModernBertHead(config)
        self.init_weights()

    def init_weights(self) -> None:
        """ModernBERT's init (the Megatron scheme the paper uses for its base model, drawn as HF's
        port draws it): normals truncated at ±2σ with σ = 0.02 for the embedding and the matrices
        that read the residual stream, σ = 0.02/sqrt(2·n_layers) for those that write into it (and
        the head's dense), unit LayerNorms, a zero output bias."""
        std = 0.02
        out_std = std / math.sqrt(2 * self.config.n_layers)
        truncated_normal(self.tok_emb.weight, std)
        for block in self.blocks:
            truncated_normal(block.attn.qkv.weight, std)
            truncated_normal(block.mlp.fc.weight, std)
            truncated_normal(block.attn.proj.weight, out_std)
            truncated_normal(block.mlp.proj.weight, out_std)
        truncated_normal(self.head.dense.weight, out_std)
        nn.init.zeros_(self.head.bias)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)

    def window_band(self, length: int, device: torch.device) -> torch.Tensor | None:
        """(T, T) bool, True where query i may attend key j in a local block: |i - j| <=
        local_window/2, as HF's ModernBERT (both sides, the query itself apart). None when the
        window spans the whole sequence."""
        half = self.config.local_window // 2
        if length - 1 <= half:
            return None
        index_T = torch.arange(length, device=device)
        return (index_T[:, None] - index_T[None, :]).abs() <= half  # (T, T): |query - key|

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final LayerNorm.

        Args:
            input_ids: (B, T) token ids, T <= ``config.max_positions``.
            attention_mask: (B, T) bool or 0/1, False/0 at padding; None when nothing is padded.
                Real tokens never attend to padding. Padding is expected on the right: without
                ``doc_ids`` the positions are 0..T-1 whatever the mask says.
            doc_ids: (B, T) document id per token, -1 at padding, documents as contiguous runs.
                Attention stays inside each packed document and rotary positions restart at 0 at
                each document's first token, so a document computes exactly what it would alone
                (the HF classes take such restarting ``position_ids`` too).
            positions: (B, Q) the only positions whose hidden states are wanted (the masked ones,
                for MLM; the encoder only): the last block then computes queries, residuals and
                MLP there alone, keys and values everywhere. The result equals those rows of the
                full output.

        Returns:
            (B, T, D) hidden states, or (B, Q, D) at ``positions``.
        """
        T = input_ids.shape[1]
        check_length(T, self.config.max_positions)
        device = input_ids.device
        token_positions = torch.arange(T, device=device) if doc_ids is None else positions_in_documents(doc_ids)
        K = self.config.head_dim
        rope = {  # (..., T, K) cosines and sines of global and of local blocks
            True: rope_cos_sin(token_positions, K, self.config.global_rope_theta),
            False: rope_cos_sin(token_positions, K, self.config.local_rope_theta),
        }
        global_mask = build_attention_mask(attention_mask, causal=self.is_causal, doc_ids=doc_ids)
        masks = {True: global_mask, False: local_mask(global_mask, self.window_band(T, device))}
        x_BTD = self.emb_dropout(self.emb_norm(self.tok_emb(input_ids)))
        *body, last = self.blocks
        for block in body:
            x_BTD = block(x_BTD, masks[block.is_global], *rope[block.is_global])
        return self.final_norm(last(x_BTD, masks[last.is_global], *rope[last.is_global], positions))

    def tail_params(self) -> int:
        """Parameters of the last block that run only at ``positions`` when given: all but the
        key and value projections (and the attention norm before them), which every position
        still needs."""
        last = self.blocks[-1]
        return sum(p.numel() for p in last.parameters()) - 2 * self.config.d_model**2 - sum(
            p.numel() for p in last.attn_norm.parameters()
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) for hidden states (..., D): any positions, e.g. only masked ones."""
        return F.linear(*self.vocab_projection(hidden))

    def vocab_projection(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features, weight, bias) such that ``logits = F.linear(features, weight, bias)``: the
        head up to its vocabulary matmul, which a fused loss runs with the cross-entropy."""
        return self.head.transform(hidden), self.tok_emb.weight, self.head.bias

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, the tied decoder once; ``exclude_embeddings`` leaves out the token table."""
        return count_params(self, exclude_embeddings)


class ModernBertCausal(ModernBert):
    """The causal twin: the same blocks and head, each position seeing only itself and earlier
    ones. ``forward`` then returns (B, T, D) where position t depends on tokens 0..t only, and
    ``logits`` gives next-token logits. HF's ``ModernBertDecoderForCausalLM`` is this model."""

    is_causal = True
    takes_positions = False

    def window_band(self, length: int, device: torch.device) -> torch.Tensor | None:
        """(T, T) bool, True where query i may attend key j in a local block: 0 <= i - j <
        local_window/2, as HF's ModernBertDecoder (whose config calls the half window its
        ``sliding_window``). None when the window spans the whole sequence."""
        half = self.config.local_window // 2
        if length <= half:
            return None
        index_T = torch.arange(length, device=device)
        distance_TT = index_T[:, None] - index_T[None, :]  # query - key
        return (distance_TT >= 0) & (distance_TT < half)


def truncated_normal(weight: torch.Tensor, std: float) -> None:
    """N(0, std²) cut at ±2·std, redrawn outside (HF ModernBERT's initializer_cutoff_factor 2)."""
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


# --- presets -------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=256, max_positions=512, local_window=64),
    "small": dict(d_model=512, n_layers=8, n_heads=8, d_ff=768, max_positions=1024, local_window=128),
    "base": dict(d_model=768, n_layers=22, n_heads=12, d_ff=1152, max_positions=8192, local_window=128),
}
"""Named sizes, for both families. d_ff is 1.5·d_model, ModernBERT-base's ratio. ``base`` is
ModernBERT-base (149M parameters with its 50368-token vocabulary)."""
