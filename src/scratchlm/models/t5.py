"""T5: the Transformer encoder-decoder of Raffel et al. 2020, in its v1.1 form, trained with span
corruption.

Pre-norm blocks (``x = x + sublayer(RMSNorm(x))``) whose RMS norm has a weight but no mean and no
bias, a final RMS norm on each stack, relative position biases (one learned scalar per head and
distance bucket, §2.1) computed once per stack and shared by all its self-attention layers, no
scaling of attention scores by 1/sqrt(K) (the init scales the queries instead), a gated-GELU
feed-forward (Shazeer 2020), no biases anywhere, one token embedding shared by encoder and decoder,
and an LM head of its own. The v1.1 changes over the original T5 (GEGLU, untied head, no dropout in
pre-training) are those of the released ``t5-v1_1`` checkpoints. Exported to
``transformers.T5ForConditionalGeneration`` by ``scratchlm.export.t5``.

Besides the legend in ``layers.py``: S is the encoder length and T the decoder length.
"""

from dataclasses import dataclass
import math

import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.models.layers import (
    Dropout,
    HeadsLinear,
    RMSNorm,
    build_attention_mask,
    check_length,
    check_positive_int,
    check_shared_fields,
    count_params,
    gelu,
    sdpa,
)

# --- config --------------------------------------------------------------------------------------


@dataclass
class T5Config:
    """Sizes of a T5 model. Defaults are the ``base`` preset: T5 v1.1 base (~248M parameters with
    its 32128-token vocabulary)."""

    vocab_size: int
    """Token vocabulary size, sentinels and special tokens included; the tokenizer decides it."""
    d_model: int = 768
    """Width of the residual stream (HF: d_model)."""
    n_layers: int = 12
    """Number of encoder blocks (HF: num_layers)."""
    n_decoder_layers: int = 12
    """Number of decoder blocks (HF: num_decoder_layers)."""
    n_heads: int = 12
    """Attention heads per block; must divide ``d_model`` (the head width is d_model/n_heads, HF: d_kv)."""
    d_ff: int = 2048
    """Hidden width of each block's gated-GELU feed-forward (HF: d_ff)."""
    max_positions: int = 512
    """Longest encoder or decoder sequence the model accepts. Relative positions need no table:
    this is the limit that is checked, and the one the exported tokenizer announces."""
    num_buckets: int = 32
    """Relative-position buckets per direction pair: half exact distances, half log-spaced ones
    (HF: relative_attention_num_buckets)."""
    max_distance: int = 128
    """Distance from which all relative positions share the last bucket
    (HF: relative_attention_max_distance)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities, each sublayer's output and the final
    hidden states (HF: dropout_rate). T5 v1.1 pre-trains with none and fine-tunes with 0.1."""
    norm_eps: float = 1e-6
    """RMS norm epsilon; 1e-6 as in T5 (HF: layer_norm_epsilon)."""

    def __post_init__(self) -> None:
        check_shared_fields(self)
        for name in ("n_decoder_layers", "num_buckets", "max_distance"):
            check_positive_int(self, name)
        if self.num_buckets < 4:
            raise ScratchLMError(
                f"model.arch.num_buckets={self.num_buckets}: T5 splits the buckets into two directions, "
                "each half exact and half logarithmic; use at least 4 (T5 uses 32)"
            )
        if self.max_distance <= self.num_buckets // 4:
            raise ScratchLMError(
                f"model.arch.max_distance={self.max_distance} must exceed num_buckets/4="
                f"{self.num_buckets // 4}, the largest distance with a bucket of its own"
            )

    @property
    def head_dim(self) -> int:
        """K, the width of one query, key or value head."""
        return self.d_model // self.n_heads


# --- relative positions --------------------------------------------------------------------------


def relative_buckets(
    query_length: int, key_length: int, *, bidirectional: bool, num_buckets: int, max_distance: int, device=None
) -> torch.Tensor:
    """(Tq, Tk) bucket of each key position relative to each query position (Raffel et al. 2020, §2.1).

    Distances below half the buckets (of one direction) get one bucket each; larger ones share
    logarithmically wider buckets up to ``max_distance``, beyond which all fall in the last one.
    Bidirectional (encoder): keys after the query use the upper half of the buckets. Causal
    (decoder): only keys at or before the query matter, and all later ones share bucket 0.
    The float arithmetic follows the reference implementation step by step (the log ratio in
    fp32, truncated toward zero), so that every distance lands in the same bucket as in
    ``T5ForConditionalGeneration``.
    """
    query_pos = torch.arange(query_length, device=device)[:, None]
    key_pos = torch.arange(key_length, device=device)[None, :]
    offset = key_pos - query_pos  # (Tq, Tk): > 0 for keys after the query
    buckets = torch.zeros_like(offset)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (offset > 0).long() * num_buckets
        distance = offset.abs()
    else:
        distance = (-offset).clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), added to the attention scores of every
    self-attention layer of a stack."""

    def __init__(self, config: T5Config, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_distance
        self.table = nn.Embedding(config.num_buckets, config.n_heads)

    def forward(self, query_length: int, key_length: int) -> torch.Tensor:
        """-> (1, H, Tq, Tk) bias in the table's dtype."""
        buckets = relative_buckets(
            query_length,
            key_length,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
            device=self.table.weight.device,
        )
        return self.table(buckets).permute(2, 0, 1)[None]  # (Tq, Tk, H) -> (1, H, Tq, Tk)


def biased_mask(bias: torch.Tensor, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The float ``attn_mask`` for SDPA: the position bias where attention is allowed, the most
    negative ``dtype`` number where not (finite, as in HF's T5: a row with nothing allowed then
    averages instead of turning NaN). (1, H, Tq, Tk) bias and (B, 1, Tq, Tk) bool -> (B, H, Tq, Tk)."""
    bias = bias.to(dtype)
    if allowed is None:
        return bias
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections of ``x`` will have: autocast's when it is on, else ``x``'s. The
    float mask must match the queries' dtype, and under autocast the embeddings stay fp32."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# --- blocks --------------------------------------------------------------------------------------


def attend(q_BHQK, k_BHTK, v_BHTK, mask, dropout: float) -> torch.Tensor:
    """SDPA with T5's unscaled scores (``scale=1``); the mask is a bool or a float bias."""
    return sdpa(q_BHQK, k_BHTK, v_BHTK, attn_mask=mask, dropout_p=dropout, scale=1.0)


class T5SelfAttention(nn.Module):
    """Multi-head self-attention without biases; the relative position bias (and the causal and
    padding masks) arrive folded into one float mask.

    One fused (3D, D) projection: rows [0, D) queries, [D, 2D) keys, [2D, 3D) values, heads K rows
    each. ``export/t5.py`` splits it there.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.attn_dropout = config.dropout
        self.qkv = HeadsLinear(config.d_model, [config.n_heads] * 3, config.d_model // config.n_heads, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q_BHTK, k_BHTK, v_BHTK = self.qkv(x_BTD)
        dropout = self.attn_dropout if self.training else 0.0
        y_BHTK = attend(q_BHTK, k_BHTK, v_BHTK, mask.to(q_BHTK.dtype), dropout)
        return self.proj(y_BHTK.transpose(1, 2).reshape(B, T, D))  # (B, T, H, K) -> (B, T, D)


class T5CrossAttention(nn.Module):
    """Decoder queries attend to the encoder's output; no position bias (T5 has none here).

    Keys and values come from one fused (2D, D) projection of the encoder output: rows [0, D)
    keys, [D, 2D) values.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.attn_dropout = config.dropout
        self.q = nn.Linear(config.d_model, config.d_model, bias=False)
        self.kv = HeadsLinear(config.d_model, [config.n_heads] * 2, config.d_model // config.n_heads, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, encoder_BSD: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), encoder output (B, S, D), mask (B, 1, 1, S) bool, True at real encoder tokens."""
        B, T, D = x_BTD.shape
        H = self.n_heads
        q_BHTK = self.q(x_BTD).view(B, T, H, D // H).transpose(1, 2)
        k_BHSK, v_BHSK = self.kv(encoder_BSD)
        dropout = self.attn_dropout if self.training else 0.0
        y_BHTK = attend(q_BHTK, k_BHSK, v_BHSK, mask, dropout)
        return self.proj(y_BHTK.transpose(1, 2).reshape(B, T, D))


class GatedGELU(nn.Module):
    """Feed-forward ``proj(gelu(gate(x)) * up(x))`` with GELU's tanh form (Shazeer 2020, FFN_GEGLU;
    HF's "gelu_new"), no biases. Gate and up are one fused (2F, D) weight: rows [0, F) the gate
    (HF: wi_0), [F, 2F) the up projection (HF: wi_1)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = Dropout(config.dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        gate_BTF, up_BTF = self.gate_up(x_BTD).chunk(2, dim=-1)
        return self.proj(self.dropout(gelu(gate_BTF, "tanh") * up_BTF))


class EncoderBlock(nn.Module):
    """``x = x + Attn(RMSNorm(x)); x = x + FF(RMSNorm(x))``, each sublayer's output through dropout."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = T5SelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = GatedGELU(config)
        self.dropout = Dropout(config.dropout)

    def forward(self, x_BSD: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.dropout(self.attn(self.attn_norm(x_BSD), mask))
        return x_BSD + self.dropout(self.mlp(self.mlp_norm(x_BSD)))


class DecoderBlock(nn.Module):
    """An encoder block with cross-attention between self-attention and feed-forward."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = T5SelfAttention(config)
        self.cross_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.cross = T5CrossAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = GatedGELU(config)
        self.dropout = Dropout(config.dropout)

    def forward(
        self, x_BTD: torch.Tensor, self_mask: torch.Tensor, encoder_BSD: torch.Tensor, cross_mask: torch.Tensor
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.dropout(self.attn(self.attn_norm(x_BTD), self_mask))
        x_BTD = x_BTD + self.dropout(self.cross(self.cross_norm(x_BTD), encoder_BSD, cross_mask))
        return x_BTD + self.dropout(self.mlp(self.mlp_norm(x_BTD)))


class Encoder(nn.Module):
    """The encoder stack: bidirectional relative bias, blocks, final RMS norm."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.position_bias = RelativePositionBias(config, bidirectional=True)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, x_BSD: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        S = x_BSD.shape[1]
        allowed = build_attention_mask(attention_mask, causal=False)  # (B, 1, S, S) or None
        mask = biased_mask(self.position_bias(S, S), allowed, compute_dtype(x_BSD))
        x_BSD = self.dropout(x_BSD)
        for block in self.blocks:
            x_BSD = block(x_BSD, mask)
        return self.dropout(self.final_norm(x_BSD))


class Decoder(nn.Module):
    """The decoder stack: causal relative bias, blocks with cross-attention, final RMS norm."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.position_bias = RelativePositionBias(config, bidirectional=False)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_decoder_layers))
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None,
        encoder_BSD: torch.Tensor,
        encoder_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones(B, T, dtype=torch.bool, device=x_BTD.device)
        allowed = build_attention_mask(decoder_attention_mask, causal=True)  # (B, 1, T, T)
        self_mask = biased_mask(self.position_bias(T, T), allowed, compute_dtype(x_BTD))
        if encoder_mask is None:
            encoder_mask = torch.ones(encoder_BSD.shape[:2], dtype=torch.bool, device=x_BTD.device)
        cross_mask = encoder_mask.bool()[:, None, None, :]  # (B, 1, 1, S): real encoder tokens
        x_BTD = self.dropout(x_BTD)
        for block in self.blocks:
            x_BTD = block(x_BTD, self_mask, encoder_BSD, cross_mask)
        return self.dropout(self.final_norm(x_BTD))


# --- model ---------------------------------------------------------------------------------------


class T5(nn.Module):
    """T5 encoder-decoder with its (untied) LM head.

    ``encode`` maps encoder ids to hidden states, ``decode`` maps decoder ids and those states to
    decoder hidden states after the final norm, ``forward`` chains the two, ``logits`` projects
    decoder states onto the vocabulary. The decoder's first input is the start token, which for
    T5 is the padding token (HF: decoder_start_token_id = pad_token_id); it is the caller's to
    supply (see ``models.seq2seq``). Position biases are recomputed on every call: no buffers.
    """

    is_causal = False
    is_encoder_decoder = True

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Mesh TensorFlow's T5 init, as in HF's ``T5PreTrainedModel``: each matrix from
        N(0, 1/fan_in), except the queries, which get a further 1/sqrt(K): that factor stands in
        for the 1/sqrt(K) score scaling T5 leaves out. Token embedding N(0, 1), position biases
        N(0, 1/D), norms one. The head gets N(0, 1/D) rather than HF's N(0, 1): the final RMS norm
        leaves hidden states of unit scale, so 1/D gives logits of unit variance and a first loss
        near ln V instead of one inflated by logits of standard deviation sqrt(D)."""
        config = self.config
        D, K = config.d_model, config.head_dim
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        nn.init.normal_(self.head.weight, std=D**-0.5)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.table.weight, std=D**-0.5)
            elif isinstance(module, T5SelfAttention):
                nn.init.normal_(module.qkv.weight, std=D**-0.5)
                nn.init.normal_(module.qkv.weight[:D], std=(D * K) ** -0.5)
                nn.init.normal_(module.proj.weight, std=D**-0.5)
            elif isinstance(module, T5CrossAttention):
                nn.init.normal_(module.q.weight, std=(D * K) ** -0.5)
                nn.init.normal_(module.kv.weight, std=D**-0.5)
                nn.init.normal_(module.proj.weight, std=D**-0.5)
            elif isinstance(module, GatedGELU):
                nn.init.normal_(module.gate_up.weight, std=D**-0.5)
                nn.init.normal_(module.proj.weight, std=config.d_ff**-0.5)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids, (B, S) bool mask (False at padding; None: nothing padded) -> (B, S, D)."""
        check_length(input_ids.shape[1], self.config.max_positions)
        return self.encoder(self.tok_emb(input_ids), attention_mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) decoder ids (the start token first), (B, S, D) encoder output, (B, S) bool
        encoder mask, (B, T) bool decoder mask (None: nothing padded) -> (B, T, D).

        Decoder position t sees decoder positions <= t and every real encoder position."""
        check_length(decoder_input_ids.shape[1], self.config.max_positions)
        return self.decoder(self.tok_emb(decoder_input_ids), decoder_attention_mask, encoder_hidden, encoder_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``decode(decoder_input_ids, encode(input_ids, attention_mask), ...)`` -> (B, T, D)."""
        encoder_hidden = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) for decoder hidden states (..., D)."""
        return self.head(hidden)

    def vocab_projection(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features, weight, bias) such that ``logits = F.linear(features, weight, bias)``: the
        head up to its vocabulary matmul, which a fused loss runs with the cross-entropy."""
        return hidden, self.head.weight, None

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count. ``exclude_embeddings`` leaves out the token table (shared by encoder
        and decoder) and the position-bias tables; the untied head stays counted."""
        return count_params(self, exclude_embeddings)


# --- presets -------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=2, n_decoder_layers=2, n_heads=4, d_ff=320, max_positions=512),
    "small": dict(d_model=512, n_layers=8, n_decoder_layers=8, n_heads=8, d_ff=1024, max_positions=512),
    "base": dict(d_model=768, n_layers=12, n_decoder_layers=12, n_heads=12, d_ff=2048, max_positions=512),
}
"""Named sizes. ``base`` is T5 v1.1 base exactly (its 12 heads of 64 at width 768); ``small`` is
T5 v1.1 small's width, depth and d_ff, with 8 heads of 64 instead of 6 (we keep K = D/H). With a
32128-token vocabulary ``base`` has ~247.6M parameters and ``small`` ~83.3M (T5 v1.1 small,
with its 6 heads, ~77.0M)."""
