"""scratchlm: pre-train small Transformer language models from scratch and export them to
Hugging Face folders that the stock ``transformers`` classes load."""

from scratchlm.data import TextDataModule, prepare_corpus
from scratchlm.errors import ScratchLMError
from scratchlm.export import export_hf, verify_export
from scratchlm.models import FAMILIES, build_config, build_model
from scratchlm.objectives import CausalLM, MaskedLM, MaskingConfig
from scratchlm.tokenizer import TokenizerInfo, train_tokenizer
from scratchlm.training import OptimConfig, PretrainModule, TrainedModel

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "CausalLM",
    "MaskedLM",
    "MaskingConfig",
    "OptimConfig",
    "PretrainModule",
    "ScratchLMError",
    "TextDataModule",
    "TokenizerInfo",
    "TrainedModel",
    "build_config",
    "build_model",
    "export_hf",
    "prepare_corpus",
    "train_tokenizer",
    "verify_export",
]
