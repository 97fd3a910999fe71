"""T5 -> T5ForConditionalGeneration: parity with encoder padding and decoder masks (sdpa and eager),
greedy generation against ours, the written files."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open
import torch
from torch import nn
import transformers

import hf_folder
from scratchlm.export import attention_implementations, export_hf, verify_export
from scratchlm.models import build_config, build_model
from scratchlm.models.seq2seq import greedy_decode

VOCAB = 300
SPECIAL = {"pad": 0, "eos": 1, "unk": 2}
# Few buckets and a short max_distance, so that sequences of 24-40 tokens reach the logarithmic
# buckets and the shared last one, where an off-by-one in the bucket arithmetic would show.
ARCH = dict(d_model=64, n_heads=4, d_ff=96, num_buckets=8, max_distance=20)


def scrambled(**overrides) -> nn.Module:
    """A tiny T5 whose every parameter is random, RMS norm weights included (fresh ones are 1,
    which would hide a swapped norm), so that a wrong name, split or layout shows in the logits."""
    torch.manual_seed(0)
    model = build_model("t5", build_config("t5", "tiny", vocab_size=VOCAB, **{**ARCH, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = scrambled()
    out = tmp_path_factory.mktemp("t5") / "hf"
    folder = export_hf(model, "t5", out, tokenizer_files=None, special_ids=SPECIAL, card={})
    return model, folder


@pytest.fixture(scope="module")
def hf_model(exported):
    return load(exported[1])[0].eval()


def load(folder: Path, **kwargs):
    return hf_folder.load(transformers.AutoModelForSeq2SeqLM, folder, **kwargs)


def padded(batch: int, length: int, seed: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return ids, mask


# --- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", attention_implementations("t5"))  # no SDPA in transformers 4
def test_hf_logits_match_ours_with_encoder_padding_and_decoder_masks(exported, impl):
    model, folder = exported
    assert verify_export(model, "t5", folder, attn_implementation=impl, batch=4, seq=32) < 1e-4


@pytest.mark.parametrize("impl", attention_implementations("t5"))  # no SDPA in transformers 4
def test_parity_with_encoder_and_decoder_of_different_lengths(exported, impl):
    model, folder = exported
    hf = load(folder, attn_implementation=impl)[0].eval()
    x, x_mask = padded(3, 40, seed=5, lengths=[40, 23, 2])
    y, y_mask = padded(3, 26, seed=6, lengths=[26, 1, 17])
    with torch.no_grad():
        ours = model.logits(model(x, x_mask, y, y_mask))
        theirs = hf(
            input_ids=x, attention_mask=x_mask.long(), decoder_input_ids=y, decoder_attention_mask=y_mask.long()
        ).logits
    assert (ours - theirs)[y_mask].abs().max().item() < 1e-4


def test_verify_export_notices_swapped_position_biases(exported):
    """Encoder and decoder bias tables have the same shape: a map that crossed them would load
    without complaint and only the logits would tell."""
    model, folder = exported
    other = scrambled()
    with torch.no_grad():
        encoder_table = other.encoder.position_bias.table.weight.clone()
        other.encoder.position_bias.table.weight.copy_(other.decoder.position_bias.table.weight)
        other.decoder.position_bias.table.weight.copy_(encoder_table)
    assert verify_export(other, "t5", folder, attn_implementation="eager") > 1e-3


# --- generation ----------------------------------------------------------------------------------


def test_hf_greedy_generate_equals_our_greedy_decode_for_20_tokens(exported, hf_model):
    model, _ = exported
    x, x_mask = padded(3, 12, seed=7, lengths=[12, 8, 3])
    theirs = hf_model.generate(
        input_ids=x, attention_mask=x_mask.long(), max_new_tokens=20, do_sample=False, num_beams=1
    )
    ours = greedy_decode(
        model, x, x_mask, start_id=SPECIAL["pad"], max_new_tokens=20, eos_id=SPECIAL["eos"], pad_id=SPECIAL["pad"]
    )
    assert ours.shape == (3, 21)  # no row met end-of-text: 20 real steps to compare
    assert torch.equal(theirs, ours)


def test_both_stop_a_row_at_eos_and_pad_it_alike(exported, hf_model):
    """Make a token that row 0 produces at step 4 the end-of-text token: row 0 stops there in both,
    padded afterwards, while the other rows go on."""
    model, _ = exported
    x, x_mask = padded(3, 12, seed=7, lengths=[12, 8, 3])
    free = greedy_decode(model, x, x_mask, start_id=0, max_new_tokens=20)
    eos = int(free[0, 4])
    theirs = hf_model.generate(
        input_ids=x, attention_mask=x_mask.long(), max_new_tokens=20, do_sample=False, eos_token_id=eos
    )
    ours = greedy_decode(model, x, x_mask, start_id=0, max_new_tokens=20, eos_id=eos, pad_id=SPECIAL["pad"])
    assert (ours[0] == eos).any() and ours[0, -1] == SPECIAL["pad"]
    assert torch.equal(theirs, ours)


# --- the folder ----------------------------------------------------------------------------------


def test_folder_loads_into_the_stock_class_with_an_untied_head(exported):
    model, folder = exported
    hf_model, info = load(folder)
    assert type(hf_model) is transformers.T5ForConditionalGeneration
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    assert hf_model.lm_head.weight.data_ptr() != hf_model.shared.weight.data_ptr()
    assert hf_model.encoder.embed_tokens.weight.data_ptr() == hf_model.shared.weight.data_ptr()
    assert hf_model.decoder.embed_tokens.weight.data_ptr() == hf_model.shared.weight.data_ptr()
    torch.testing.assert_close(hf_model.lm_head.weight, model.head.weight)


def test_weights_are_written_split_and_the_embedding_once(exported):
    _, folder = exported
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert not [name for name in shapes if "embed_tokens" in name]
    assert shapes["shared.weight"] == shapes["lm_head.weight"] == (VOCAB, 64)
    assert shapes["decoder.block.1.layer.1.EncDecAttention.k.weight"] == (64, 64)
    assert shapes["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] == (96, 64)
    assert shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (8, 4)
    assert not [name for name in shapes if "bias" in name and "relative_attention_bias" not in name]
    assert not [name for name in shapes if "block.1" in name and "relative_attention_bias" in name]


def test_configs_describe_the_model(exported):
    _, folder = exported
    config = hf_folder.saved_config(folder)
    assert config["architectures"] == ["T5ForConditionalGeneration"] and config["model_type"] == "t5"
    assert (config["d_model"], config["d_kv"], config["num_heads"], config["d_ff"]) == (64, 16, 4, 96)
    assert (config["num_layers"], config["num_decoder_layers"]) == (2, 2)
    assert (config["relative_attention_num_buckets"], config["relative_attention_max_distance"]) == (8, 20)
    assert config["feed_forward_proj"] == "gated-gelu"
    assert config.get("scale_decoder_outputs", False) is False  # a field of transformers 5 only
    # transformers 4 reads only this field: true would tie the head to the embedding and scale the
    # decoder output, and the folder would give other logits there.
    assert config["tie_word_embeddings"] is False
    assert (config["pad_token_id"], config["eos_token_id"], config["decoder_start_token_id"]) == (0, 1, 0)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["decoder_start_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (0, 1, 0)
