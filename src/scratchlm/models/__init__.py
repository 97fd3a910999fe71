"""Model families and the registry that builds them by name.

Every model follows one contract, whatever its family:

- ``model.config``: the family's config dataclass; ``model.is_causal``: a class attribute.
- ``model(input_ids (B, T), attention_mask (B, T) | None) -> (B, T, D)`` hidden states.
- ``model.logits(hidden (..., D)) -> (..., V)``: the LM or MLM head, on any subset of positions.
- ``model.init_weights()`` (run at the end of ``__init__``) and ``model.num_params(...)``.
- No registered buffers, no labels, no loss.

Encoder-decoder families (``is_encoder_decoder = True``: t5, bart) replace ``forward`` with
``encode`` / ``decode``; their contract is in ``models/seq2seq.py``.
"""

from dataclasses import dataclass, fields
from typing import Literal

from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.models import bart, bert, gpt2, llama, modernbert, t5
from scratchlm.models.bart import Bart, BartConfig
from scratchlm.models.bert import Bert, BertConfig
from scratchlm.models.gpt2 import GPT2, GPT2Config
from scratchlm.models.llama import Llama, LlamaConfig
from scratchlm.models.modernbert import ModernBert, ModernBertCausal, ModernBertConfig
from scratchlm.models.t5 import T5, T5Config


@dataclass(frozen=True)
class Family:
    """What the rest of scratchlm needs to know about a model family."""

    name: str
    """Registry key, e.g. "bert"."""
    config: type
    """The family's config dataclass."""
    model: type[nn.Module]
    """The model class; built as ``model(config)``."""
    presets: dict[str, dict]
    """Size name -> config fields (all but ``vocab_size``)."""
    causal: bool
    """Whether position t sees only positions <= t."""
    objective: Literal["mlm", "clm", "span", "infill"]
    """The pre-training objective used when none is chosen."""

    @property
    def encoder_decoder(self) -> bool:
        """Whether the model is an encoder-decoder (see ``models.seq2seq``)."""
        return getattr(self.model, "is_encoder_decoder", False)


FAMILIES: dict[str, Family] = {
    "bart": Family("bart", BartConfig, Bart, bart.PRESETS, causal=Bart.is_causal, objective="infill"),
    "bert": Family("bert", BertConfig, Bert, bert.PRESETS, causal=Bert.is_causal, objective="mlm"),
    "gpt2": Family("gpt2", GPT2Config, GPT2, gpt2.PRESETS, causal=GPT2.is_causal, objective="clm"),
    "llama": Family("llama", LlamaConfig, Llama, llama.PRESETS, causal=Llama.is_causal, objective="clm"),
    "modernbert": Family(
        "modernbert", ModernBertConfig, ModernBert, modernbert.PRESETS, causal=ModernBert.is_causal, objective="mlm"
    ),
    "modernbert-causal": Family(
        "modernbert-causal",
        ModernBertConfig,
        ModernBertCausal,
        modernbert.PRESETS,
        causal=ModernBertCausal.is_causal,
        objective="clm",
    ),
    "t5": Family("t5", T5Config, T5, t5.PRESETS, causal=T5.is_causal, objective="span"),
}


def get_family(family: str) -> Family:
    """The registered family called ``family``, or an error listing the choices."""
    if family not in FAMILIES:
        raise ScratchLMError(f"model.family={family!r}: unknown; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def build_config(family: str, size: str = "tiny", *, vocab_size: int, **overrides):
    """The config of preset ``size`` of ``family``, with ``vocab_size`` and field ``overrides``.

    Example: ``build_config("gpt2", "tiny", vocab_size=8192, n_layers=2)``.
    """
    spec = get_family(family)
    if size not in spec.presets:
        raise ScratchLMError(f"model.size={size!r}: unknown for {family}; choose one of {list(spec.presets)}")
    known = [f.name for f in fields(spec.config) if f.name != "vocab_size"]
    for key in overrides:
        if key not in known:
            raise ScratchLMError(f"model.arch.{key}: not a {family} config field; valid fields: {', '.join(known)}")
    return spec.config(vocab_size=vocab_size, **{**spec.presets[size], **overrides})


def build_model(family: str, config) -> nn.Module:
    """A freshly initialised model of ``family`` from ``config`` (a config of that family)."""
    spec = get_family(family)
    if not isinstance(config, spec.config):
        raise ScratchLMError(
            f"{type(config).__name__} is not a {family} config; build it with build_config({family!r}, ...)"
        )
    return spec.model(config)


__all__ = [
    "FAMILIES",
    "GPT2",
    "Bart",
    "BartConfig",
    "Bert",
    "BertConfig",
    "Family",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "ModernBert",
    "ModernBertCausal",
    "ModernBertConfig",
    "T5",
    "T5Config",
    "build_config",
    "build_model",
    "get_family",
]
