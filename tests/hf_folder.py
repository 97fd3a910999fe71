"""Reading an exported folder back the same way under transformers 4 and 5."""

import json
from pathlib import Path

import torch
import transformers


def load(auto_class, folder: Path, **kwargs):
    """(model in fp32, loading info). The info's key lists come as sets: transformers 4 gives
    lists, 5 sets."""
    model, info = auto_class.from_pretrained(folder, output_loading_info=True, dtype=torch.float32, **kwargs)
    return model, {name: set(value) if name.endswith("_keys") else value for name, value in info.items()}


def saved_config(folder: Path) -> dict:
    """config.json with the config class's defaults filled in: transformers 4 leaves out every
    field at its default value when it saves, 5 writes them all. What the file says wins."""
    return transformers.AutoConfig.from_pretrained(folder).to_dict() | json.loads((folder / "config.json").read_text())
