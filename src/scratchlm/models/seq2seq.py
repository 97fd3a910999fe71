"""What encoder-decoder families (``t5``, ``bart``) share beyond the contract in ``models/__init__``.

An encoder-decoder model has the class attributes ``is_causal = False`` and
``is_encoder_decoder = True`` and these methods:

- ``encode(input_ids (B, S), attention_mask (B, S) bool) -> (B, S, D)``;
- ``decode(decoder_input_ids (B, T), encoder_hidden (B, S, D), encoder_mask (B, S) bool,
  decoder_attention_mask (B, T) bool | None = None) -> (B, T, D)``: causal self-attention over the
  decoder ids, cross-attention to the real encoder positions;
- ``forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None)``, the two
  chained, and ``logits(hidden (..., D)) -> (..., V)``;
- ``config.max_positions`` bounds S and T.

The decoder's start token is not the model's: it comes with the tokenizer's special ids (T5 starts
with the padding token, BART with end-of-text), as the exported HF config's
``decoder_start_token_id`` does.
"""

import torch
from torch import nn


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` follows the encoder-decoder contract above."""
    return getattr(model, "is_encoder_decoder", False)


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    start_id: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    *,
    pad_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding of an encoder-decoder model: at each step the highest-scoring token.

    Plain recompute, no key/value cache: the whole decoder prefix runs again at each step, which
    is slow for long outputs but has nothing to get wrong, so it serves as the reference that
    HF's ``generate()`` is checked against. Dropout is off while decoding (the model's training
    mode comes back afterwards).

    Stops as ``generate(do_sample=False, num_beams=1)`` does: a row that has produced ``eos_id``
    is finished, and its later positions are ``pad_id`` (``eos_id`` when ``pad_id`` is None);
    decoding ends when every row is finished or after ``max_new_tokens``. With ``eos_id`` None it
    always runs ``max_new_tokens`` steps.

    Args:
        model: an encoder-decoder model (see the module docstring).
        input_ids: (B, S) encoder ids.
        attention_mask: (B, S) bool, False at encoder padding; None when nothing is padded.
        start_id: the decoder's first token (T5: pad; BART: eos).
        max_new_tokens: most tokens to generate after the start token.
        eos_id: the token that finishes a row, or None.
        pad_id: what finished rows hold from then on.

    Returns:
        (B, 1 + n) int64: the start token, then n <= ``max_new_tokens`` generated tokens.
    """
    was_training = model.training
    model.eval()
    try:
        encoder_hidden = model.encode(input_ids, attention_mask)
        B = input_ids.shape[0]
        out = torch.full((B, 1), start_id, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        filler = eos_id if pad_id is None else pad_id
        for _ in range(max_new_tokens):
            hidden_BTD = model.decode(out, encoder_hidden, attention_mask)
            next_B = model.logits(hidden_BTD[:, -1]).argmax(dim=-1)
            if eos_id is not None:
                next_B = torch.where(finished, filler, next_B)
                finished |= next_B == eos_id
            out = torch.cat([out, next_B[:, None]], dim=1)
            if finished.all():
                break
        return out
    finally:
        model.train(was_training)
