"""Training FLOPs per token of a model, counted from its weights: the numerator of model FLOPs
utilisation (MFU), and the compute axis on which ``scratchlm compare`` matches its arms.

Encoders and decoders run every weight on every position of a block (``FlopCount``). An
encoder-decoder turns a block of L tokens into S encoder and T decoder positions (the objective
decides S and T) and runs each weight on one side only (``EncoderDecoderFlopCount``); its FLOPs
are still given per token of the block, so that models trained on one token stream share a scale.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per token of a model: 6·N per token for the weights each
    token uses (2 forward, 4 backward; Kaplan et al. 2020, §2.1) plus 12·L·T·D for attention
    scores and their weighted sum (PaLM, Chowdhery et al. 2022, appendix B). Attention counts the
    whole T×T square: that is what the kernels compute for local windows and causal masks too.
    Embedding lookups are no matmuls and cost nothing here."""

    body: int
    """Weights every position runs through: the non-embedding parameters outside the head."""
    head: int
    """Weights of the prediction head, the output matrix (V·D, tied or not) included."""
    head_fraction: float
    """Share of positions the head runs on: 1 for causal LM, the mask rate for MLM (whose head
    runs on the masked positions only, see ``objectives.mlm``)."""
    n_layers: int
    block_size: int
    d_model: int
    tail: int = 0
    """Weights of the body that run, like the head, on the head's share of positions only: the
    last block's all but its keys and values, when the model computes it at the masked positions
    alone (``takes_positions``; see ``models.bert``)."""

    @property
    def attention(self) -> float:
        sparse_layers = 1 if self.tail else 0  # its queries on the head's share only
        layers = self.n_layers - sparse_layers + sparse_layers * self.head_fraction
        return 12 * layers * self.block_size * self.d_model

    @property
    def per_token(self) -> float:
        return 6 * (self.body - self.tail + self.head_fraction * (self.tail + self.head)) + self.attention


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``model.logits`` reads (each once), found by differentiating it: the model
    contract names no head module, and a tied output matrix is the token embedding."""
    weight = next(model.parameters())
    hidden = torch.zeros(1, model.config.d_model, device=weight.device, dtype=weight.dtype, requires_grad=True)
    params = list(dict.fromkeys(model.parameters()))
    grads = torch.autograd.grad(model.logits(hidden).sum(), params, allow_unused=True)
    return [p for p, g in zip(params, grads) if g is not None]


def flop_count(
    model: nn.Module, objective: str, block_size: int, mask_rate: float, lengths: tuple[int, int] | None = None
) -> "FlopCount | EncoderDecoderFlopCount":
    """The FLOPs per token of training ``model`` with ``objective`` on blocks of ``block_size``.

    An encoder-decoder also needs ``lengths``: the (S, T) encoder and decoder lengths its objective
    makes of one block (``PretrainModule.sequence_lengths``)."""
    if getattr(model, "is_encoder_decoder", False):
        if lengths is None:
            raise ValueError("an encoder-decoder's FLOPs need the (encoder, decoder) lengths of a block")
        return encoder_decoder_flop_count(model, block_size, *lengths)
    head = head_parameters(model)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head_outside_tables = sum(p.numel() for p in head if id(p) not in tables)
    config = model.config
    sparse_tail = objective == "mlm" and getattr(model, "takes_positions", False)
    return FlopCount(
        body=model.num_params(exclude_embeddings=True) - head_outside_tables,
        head=sum(p.numel() for p in head),
        head_fraction=mask_rate if objective == "mlm" else 1.0,
        n_layers=config.n_layers,
        block_size=block_size,
        d_model=config.d_model,
        tail=model.tail_params() if sparse_tail else 0,
    )


# --- encoder-decoders ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderDecoderFlopCount:
    """Training FLOPs per block token of an encoder-decoder that reads a block of L tokens as S
    encoder positions and writes T decoder positions (span corruption: S = L - noise + spans + 1,
    T = noise + spans + 1). The rules of ``FlopCount``, applied per side: 6 per weight per position
    it runs on, and 12·D per query-key pair per layer for attention (the encoder's S×S, the
    decoder's causal T×T counted whole, and its T×S cross-attention). Dividing by L puts the
    count on the scale of the block's tokens, the raw tokens of the stream."""

    encoder: int
    """Weights that run on the S encoder positions: the encoder stack, and the decoder's
    cross-attention key and value projections, which read the encoder's output."""
    decoder: int
    """Weights that run on the T decoder positions, the head left out."""
    head: int
    """Weights of the prediction head (on every decoder position)."""
    n_layers: int
    """Encoder layers."""
    n_decoder_layers: int
    block_size: int
    """L, the block tokens one (S, T) pair is made from."""
    encoder_length: int
    """S."""
    decoder_length: int
    """T."""
    d_model: int

    @property
    def attention(self) -> float:
        S, T = self.encoder_length, self.decoder_length
        pairs = self.n_layers * S * S + self.n_decoder_layers * (T * T + T * S)
        return 12 * self.d_model * pairs / self.block_size

    @property
    def per_token(self) -> float:
        weights = self.encoder * self.encoder_length + (self.decoder + self.head) * self.decoder_length
        return 6 * weights / self.block_size + self.attention


def encoder_side_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters that run on encoder positions, found by one forward pass with an
    encoder of 3 positions and a decoder of 2: every module owning parameters is asked the
    length of the hidden states it reads. This finds the encoder stack and the cross-attention
    key/value projections alike, whatever the family names them."""
    S, T = 3, 2
    found: set[int] = set()

    def note(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 3 and x.shape[1] == S:
            found.update(id(p) for p in module.parameters(recurse=False))

    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    handles = [m.register_forward_pre_hook(note) for m in owners]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros(1, S, dtype=torch.long, device=device), None, torch.zeros(1, T, dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return found


def encoder_decoder_flop_count(model: nn.Module, block_size: int, encoder_length: int, decoder_length: int) -> EncoderDecoderFlopCount:
    """The FLOPs per block token of training an encoder-decoder on (S, T) = the two lengths."""
    head = {id(p): p for p in head_parameters(model)}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    weights = {id(p): p for p in model.parameters() if id(p) not in tables and id(p) not in head}
    on_encoder = encoder_side_parameters(model)
    config = model.config
    return EncoderDecoderFlopCount(
        encoder=sum(p.numel() for i, p in weights.items() if i in on_encoder),
        decoder=sum(p.numel() for i, p in weights.items() if i not in on_encoder),
        head=sum(p.numel() for p in head.values()),
        n_layers=config.n_layers,
        n_decoder_layers=config.n_decoder_layers,
        block_size=block_size,
        encoder_length=encoder_length,
        decoder_length=decoder_length,
        d_model=config.d_model,
    )
