"""Export to Hugging Face folders: the only place that knows HF parameter names.

``export_hf`` writes a folder the stock ``transformers`` class of the family loads;
``verify_export`` proves it computes the same logits as our model.
"""

from scratchlm.export.hf import (
    TARGETS,
    HFTarget,
    attention_implementations,
    check_exportable,
    export_hf,
    hf_auto_class,
    hf_target,
    verify_export,
)

__all__ = [
    "TARGETS",
    "HFTarget",
    "attention_implementations",
    "check_exportable",
    "export_hf",
    "hf_auto_class",
    "hf_target",
    "verify_export",
]
