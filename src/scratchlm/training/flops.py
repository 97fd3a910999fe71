"""Training FLOPs per token of a model, counted from its weights: the numerator of model FLOPs
utilisation (MFU), and the compute axis on which ``scratchlm compare`` matches its arms."""

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

    @property
    def attention(self) -> int:
        return 12 * self.n_layers * self.block_size * self.d_model

    @property
    def per_token(self) -> float:
        return 6 * (self.body + self.head_fraction * self.head) + self.attention


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``model.logits`` reads (each once), found by differentiating it: the model
    contract names no head module, and a tied output matrix is the token embedding."""
    weight = next(model.parameters())
    hidden = torch.zeros(1, model.config.d_model, device=weight.device, dtype=weight.dtype, requires_grad=True)
    params = list(dict.fromkeys(model.parameters()))
    grads = torch.autograd.grad(model.logits(hidden).sum(), params, allow_unused=True)
    return [p for p, g in zip(params, grads) if g is not None]


def flop_count(model: nn.Module, objective: str, block_size: int, mask_rate: float) -> FlopCount:
    """The FLOPs per token of training ``model`` with ``objective`` on blocks of ``block_size``."""
    head = head_parameters(model)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head_outside_tables = sum(p.numel() for p in head if id(p) not in tables)
    config = model.config
    return FlopCount(
        body=model.num_params(exclude_embeddings=True) - head_outside_tables,
        head=sum(p.numel() for p in head),
        head_fraction=mask_rate if objective == "mlm" else 1.0,
        n_layers=config.n_layers,
        block_size=block_size,
        d_model=config.d_model,
    )
