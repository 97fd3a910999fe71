"""scratchlm: pre-train small Transformer language models from scratch and export them to
Hugging Face folders that the stock ``transformers`` classes load.

Each name below is imported on first use from the module that defines it: PyTorch,
``transformers`` and Lightning take seconds each to import, and neither ``import scratchlm`` nor
a command that needs none of them (``scratchlm tokenizer``, ``scratchlm --help``) waits for them.
"""

import importlib

__version__ = "0.1.0"

_HOMES = {
    "FAMILIES": "scratchlm.models",
    "CausalLM": "scratchlm.objectives",
    "MaskedLM": "scratchlm.objectives",
    "MaskingConfig": "scratchlm.objectives",
    "OptimConfig": "scratchlm.training.optim",
    "PretrainModule": "scratchlm.training.module",
    "ScratchLMError": "scratchlm.errors",
    "TextDataModule": "scratchlm.data.module",
    "TokenizerInfo": "scratchlm.tokenizer",
    "TrainedModel": "scratchlm.training.checkpoint",
    "build_config": "scratchlm.models",
    "build_model": "scratchlm.models",
    "export_hf": "scratchlm.export",
    "prepare_corpus": "scratchlm.data.prepared",
    "train_tokenizer": "scratchlm.tokenizer",
    "verify_export": "scratchlm.export",
}
"""Public name -> the module that defines it."""

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
