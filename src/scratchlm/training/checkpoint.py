"""A trained model with what its export needs, from a live module or from a checkpoint file."""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.export import export_hf
from scratchlm.models import FAMILIES, build_model

if TYPE_CHECKING:  # a Lightning class: exporting a checkpoint does not import Lightning
    from scratchlm.training.module import PretrainModule

CHECKPOINT_KEY = "scratchlm"
"""Where our own record lives inside a Lightning checkpoint (``PretrainModule.on_save_checkpoint``)."""


@dataclass
class TrainedModel:
    """A model and its record (see ``PretrainModule.record``)."""

    model: nn.Module
    record: dict[str, Any]

    @classmethod
    def from_module(cls, module: "PretrainModule") -> "TrainedModel":
        return cls(module.model, module.record())

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "TrainedModel":
        path = Path(path)
        if path.is_dir():
            found = sorted(p.name for p in path.glob("*.ckpt"))
            raise ScratchLMError(
                f"checkpoint {path} is a folder; give one checkpoint file"
                + (f" in it ({', '.join(found[:3])})" if found else " (<run dir>/checkpoints/last.ckpt)")
            )
        if not path.is_file():
            raise ScratchLMError(f"checkpoint {path} does not exist")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # a torn or foreign file: say which
            raise ScratchLMError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None
        record = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
        if record is None:
            raise ScratchLMError(f"checkpoint {path} holds no scratchlm record; export needs one written by scratchlm fit")
        family = FAMILIES[record["family"]]
        model = build_model(record["family"], family.config(**record["config"]))
        prefix = "model."
        weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        model.load_state_dict(weights)
        return cls(model.eval(), record)

    @property
    def family(self) -> str:
        return self.record["family"]

    def card(self) -> dict[str, Any]:
        """What the model card reports."""
        record = self.record
        return {
            "family": record["family"],
            "objective": record["objective"],
            "corpus": record.get("corpus"),
            "steps": record.get("steps"),
            "tokens_seen": record.get("tokens_seen"),
            **{name.replace("/", "_"): value for name, value in (record.get("metrics") or {}).items()},
        }

    def export(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        return export_hf(
            self.model,
            self.family,
            out_dir,
            tokenizer_files=self.record["tokenizer_files"],
            special_ids=self.record["special_ids"],
            card=self.card(),
            overwrite=overwrite,
        )
