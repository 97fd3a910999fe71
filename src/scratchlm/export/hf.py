"""Writing a model as a Hugging Face folder, atomically, and proving the folder computes the same logits.

The per-family knowledge (HF names, layouts, config fields) lives in ``export/<family>.py``; this
module holds what every family shares: the folder layout, the atomic write (through
``scratchlm.folders``) and the parity check.
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
import torch
from torch import nn
import transformers

from scratchlm.errors import ScratchLMError
from scratchlm.export import bart, bert, gpt2, llama, modernbert, t5
from scratchlm.export.card import model_card
from scratchlm.folders import check_destination, flush_to_disk, replace_folder, staging_folder
from scratchlm.models import get_family
from scratchlm.tokenizer import TOKENIZER_FILES

SPECIAL_KEYS = ("pad", "eos", "bos", "mask", "cls", "sep", "unk")
"""The keys of ``special_ids``."""

WRITTEN_BY_US = frozenset({"config.json", "generation_config.json", "model.safetensors", "README.md"})
"""Files of the folder that tokenizer files may not replace."""


@dataclass(frozen=True)
class HFTarget:
    """The stock HF class a family exports to, and how to get there."""

    hf_class: type
    """The ``transformers`` model class, named in config.json's ``architectures``."""
    auto_class: type
    """The ``AutoModelFor*`` class that loads the folder."""
    hf_config: Callable[[Any, dict[str, int | None]], transformers.PretrainedConfig]
    """(our config, special ids) -> the HF config."""
    hf_state_dict: Callable[[nn.Module], dict[str, torch.Tensor]]
    """Our model -> its weights under HF names and layouts, each shared tensor once."""
    input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    """What the exported tokenizer returns (its ``model_input_names``). Said in the folder, since
    the default differs between transformers 4 (with ``token_type_ids``) and 5 (without); GPT-2
    would add the embedding of token 0 to every position if given type ids of zero."""
    check: Callable[[Any], None] | None = None
    """(our config) -> None, or a ScratchLMError where the installed ``transformers`` cannot
    load a model of that config as it is; called by ``export_hf``, and before training, so a
    run never ends in an export that must fail."""
    v4_fields: Callable[[Any], dict[str, Any]] | None = None
    """(our config) -> config.json entries under the names transformers 4 reads, where 5 renamed
    a setting (RoPE's theta): 5 reads its own names and ignores these."""


TARGETS: dict[str, HFTarget] = {
    "bart": HFTarget(bart.HF_CLASS, bart.AUTO_CLASS, bart.hf_config, bart.hf_state_dict),
    "bert": HFTarget(
        bert.HF_CLASS,
        bert.AUTO_CLASS,
        bert.hf_config,
        bert.hf_state_dict,
        input_names=("input_ids", "token_type_ids", "attention_mask"),
    ),
    "gpt2": HFTarget(gpt2.HF_CLASS, gpt2.AUTO_CLASS, gpt2.hf_config, gpt2.hf_state_dict),
    "llama": HFTarget(
        llama.HF_CLASS, llama.AUTO_CLASS, llama.hf_config, llama.hf_state_dict, v4_fields=llama.v4_fields
    ),
    "modernbert": HFTarget(
        modernbert.HF_CLASS,
        modernbert.AUTO_CLASS,
        modernbert.hf_config,
        modernbert.hf_state_dict,
        v4_fields=modernbert.v4_fields,
    ),
    "modernbert-causal": HFTarget(
        modernbert.CAUSAL_HF_CLASS,
        modernbert.CAUSAL_AUTO_CLASS,
        modernbert.causal_hf_config,
        modernbert.causal_hf_state_dict,
        check=modernbert.check_causal_exportable,
        v4_fields=modernbert.v4_fields,
    ),
    "t5": HFTarget(t5.HF_CLASS, t5.AUTO_CLASS, t5.hf_config, t5.hf_state_dict),
}


def hf_target(family: str) -> HFTarget:
    get_family(family)  # an unknown name gets the registry's error, listing the families
    if family not in TARGETS:
        raise ScratchLMError(f"family {family!r} has no Hugging Face export yet; choose one of {sorted(TARGETS)}")
    return TARGETS[family]


def check_exportable(family: str, config: Any) -> None:
    """Raise a ScratchLMError now if a model of ``family`` and ``config`` could not be exported
    with the installed ``transformers`` (see ``HFTarget.check``)."""
    check = TARGETS[family].check if family in TARGETS else None
    if check is not None:
        check(config)


def hf_auto_class(family: str) -> str:
    """Name of the ``transformers`` auto class that loads an export of ``family``."""
    return hf_target(family).auto_class.__name__


# --- export --------------------------------------------------------------------------------------


def export_hf(
    model: nn.Module,
    family: str,
    out_dir: str | os.PathLike,
    *,
    tokenizer_files: dict[str, str] | None,
    special_ids: dict[str, int | None],
    card: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face folder that the stock class of its family loads.

    The folder holds config.json, model.safetensors (fp32), generation_config.json (causal and
    encoder-decoder families), the tokenizer files as given (name -> text), and a README.md model card.

    The write is atomic: everything goes into a hidden sibling folder first, which then takes
    ``out_dir``'s place. An existing non-empty ``out_dir`` is refused unless ``overwrite``; with
    it, the old folder is replaced only once the new one is complete, so a failure while writing
    leaves it as it was. (Between moving the old folder aside and the new one in there are two
    renames; a kill exactly between them leaves the old folder as ``.<name>.old-*`` next to it.)

    Args:
        model: a model of ``family`` (its config is ``model.config``).
        family: registry name, e.g. "bert".
        out_dir: the folder to write.
        tokenizer_files: file name -> text, written verbatim; None writes no tokenizer.
        special_ids: token ids for the keys in ``SPECIAL_KEYS`` (None where absent); pad, bos and
            eos go into the configs.
        card: facts about the training run for the model card (see ``export.card``).
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        ``out_dir`` as an absolute path.
    """
    target = hf_target(family)
    model = unwrap(model)
    check_exportable(family, model.config)
    check_special_ids(special_ids, model.config.vocab_size)
    check_tokenizer_names(tokenizer_files or {})
    out = Path(out_dir).resolve()
    # Only a previous export is replaced: a run folder, a fine-tuned model or the user's own files
    # are refused, even with --overwrite, since the whole folder goes.
    check_destination(
        out, label="export folder", what="an export", owned=WRITTEN_BY_US | set(TOKENIZER_FILES),
        overwrite_flag="--overwrite", overwrite=overwrite,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out) as staging:
        write_folder(staging, model, family, target, tokenizer_files or {}, special_ids, card)
        flush_to_disk(staging)
        replace_folder(staging, out)
    return out


def write_folder(
    folder: Path,
    model: nn.Module,
    family: str,
    target: HFTarget,
    tokenizer_files: dict[str, str],
    special_ids: dict[str, int | None],
    card: dict[str, Any],
) -> None:
    """Every file of the export, into ``folder``."""
    hf_config = target.hf_config(model.config, special_ids)
    hf_config.save_pretrained(folder)
    if target.v4_fields is not None:
        add_config_fields(folder / "config.json", target.v4_fields(model.config))
    if get_family(family).causal or get_family(family).encoder_decoder:
        decoder_start = hf_config.decoder_start_token_id if hf_config.is_encoder_decoder else None
        generation_config(special_ids, decoder_start).save_pretrained(folder)
    save_file(fp32_cpu(target.hf_state_dict(model)), folder / "model.safetensors", metadata={"format": "pt"})
    for name, text in tokenizer_files.items():
        if name == "tokenizer_config.json":
            text = exported_tokenizer_config(text, model.config.max_positions, target.input_names)
        (folder / name).write_text(text, encoding="utf-8")
    readme = model_card(
        family=family,
        hf_class=target.hf_class.__name__,
        auto_class=target.auto_class.__name__,
        config=model.config,
        num_params=model.num_params(),
        num_params_non_embedding=model.num_params(exclude_embeddings=True),
        card=card,
    )
    (folder / "README.md").write_text(readme, encoding="utf-8")


def exported_tokenizer_config(tokenizer_config: str, max_positions: int, input_names: tuple[str, ...]) -> str:
    """``tokenizer_config.json`` as the export writes it:

    - ``model_max_length`` at most the model's positions: HF tokenizers and pipelines truncate to
      it, and a longer input would run past a learned position table (an IndexError deep inside
      the model instead of a truncation);
    - ``model_input_names``, the inputs the model takes (see ``HFTarget.input_names``).
    """
    config = json.loads(tokenizer_config)
    limit = config.get("model_max_length")
    if limit is None or limit > max_positions:
        config["model_max_length"] = max_positions
    config["model_input_names"] = list(input_names)
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def add_config_fields(config_json: Path, fields: dict[str, Any]) -> None:
    """``fields`` set in a written config.json (transformers 4 writes its defaults for them)."""
    config = json.loads(config_json.read_text(encoding="utf-8"))
    config_json.write_text(json.dumps(config | fields, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def generation_config(
    special_ids: dict[str, int | None], decoder_start_token_id: int | None = None
) -> transformers.GenerationConfig:
    """Ids ``generate()`` needs: start (bos), stop (eos) and fill (pad), and for encoder-decoders
    the decoder's first token (the family's HF config decides it: pad for T5, eos for BART)."""
    return transformers.GenerationConfig(
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        decoder_start_token_id=decoder_start_token_id,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself when ``torch.compile`` wrapped it (its state-dict names gain ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)


def fp32_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies, each with its own storage: safetensors refuses tensors that
    share memory (the three chunks of a fused QKV do) and needs contiguous ones (a transpose is
    not)."""
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in tensors.items()}


# --- checks --------------------------------------------------------------------------------------


def check_special_ids(special_ids: dict[str, int | None], vocab_size: int) -> None:
    for key, value in special_ids.items():
        if key not in SPECIAL_KEYS:
            raise ScratchLMError(f"special_ids[{key!r}]: unknown key; use {', '.join(SPECIAL_KEYS)}")
        if value is not None and not 0 <= value < vocab_size:
            raise ScratchLMError(
                f"special_ids[{key!r}]={value} is outside the model's vocabulary of {vocab_size}; "
                "export with the tokenizer the model was trained with"
            )


def check_tokenizer_names(tokenizer_files: dict[str, str]) -> None:
    for name in tokenizer_files:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ScratchLMError(f"tokenizer file name {name!r}: must be a plain file name, without folders")
        if name in WRITTEN_BY_US:
            raise ScratchLMError(f"tokenizer file name {name!r} would replace the export's own {name}; rename it")


# --- verification --------------------------------------------------------------------------------


def attention_implementations(family: str) -> tuple[str, ...]:
    """The attention implementations of the installed ``transformers`` that ``verify_export``
    compares for ``family``: "sdpa" and "eager", or "eager" alone where the class has no SDPA
    path (T5 before transformers 5.15)."""
    return ("sdpa", "eager") if hf_target(family).hf_class._supports_sdpa else ("eager",)


def verify_export(
    model: nn.Module,
    family: str,
    out_dir: str | os.PathLike,
    *,
    attn_implementation: str = "sdpa",
    batch: int = 3,
    seq: int = 16,
    seed: int = 0,
) -> float:
    """Largest |logit difference| between ``model`` and the HF model loaded from ``out_dir``.

    Loads the folder with the family's auto class in fp32 with ``attn_implementation`` ("sdpa",
    "eager", ...), feeds both models the same random ids, right-padded to rows of different
    lengths (see ``padded_batch``), and compares logits at the real tokens only. Both run in
    eval mode; ``model`` gets its training mode back afterwards.

    Encoder-decoders get padded random encoder ids and, independently, padded random decoder
    ids with a decoder attention mask; the logits are compared at the real decoder positions.
    """
    target = hf_target(family)
    model = unwrap(model)
    with quiet_transformers():
        hf_model = target.auto_class.from_pretrained(
            out_dir, dtype=torch.float32, attn_implementation=attn_implementation
        ).eval()
    vocab_size = model.config.vocab_size
    input_ids, attention_mask = padded_batch(vocab_size, batch, seq, seed)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    compared = attention_mask
    if get_family(family).encoder_decoder:
        decoder_ids, decoder_mask = padded_batch(vocab_size, batch, seq, seed + 1)
        inputs |= {"decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask}
        compared = decoder_mask
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = model(*(tensor.to(device) for tensor in inputs.values()))
            ours = model.logits(hidden).float().cpu()
            hf_inputs = {name: t.long() if name.endswith("mask") else t for name, t in inputs.items()}
            theirs = hf_model(**hf_inputs).logits
    finally:
        model.train(was_training)
    return (ours - theirs)[compared].abs().max().item()


def padded_batch(vocab_size: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, T) and a right-padding mask (B, T) bool: row 0 is full, every other row
    is padded after a random length in [1, T)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab_size, (batch, seq), generator=generator)
    lengths = torch.randint(1, max(seq, 2), (batch,), generator=generator)
    lengths[0] = seq
    attention_mask = torch.arange(seq)[None, :] < lengths[:, None]  # (B, T)
    return input_ids, attention_mask


@contextmanager
def quiet_transformers():
    """Load without the progress bar and the load report: ``verify_export`` judges the result by
    its logits, and BERT's report would list the pooler we add on purpose (see ``export.bert``)."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
