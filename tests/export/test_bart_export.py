"""BART -> BartForConditionalGeneration: parity with encoder padding and decoder masks (sdpa and
eager), greedy generation against ours, one shared embedding, the written files; and end to end,
a short fit whose folder loads and generates, and export --verify."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open
import torch
from torch import nn
import transformers
from transformers.pipelines import SUPPORTED_TASKS

import hf_folder
from runs import RECIPES, SEQ2SEQ_FIT, TEXT2TEXT_MISSING, run_cli, run_main, text2text_pipeline_is_our_greedy_decode
from scratchlm.export import export_hf, verify_export
from scratchlm.models import build_config, build_model
from scratchlm.models.seq2seq import greedy_decode
from scratchlm.objectives import InfillConfig
from scratchlm.tokenizer import train_tokenizer
from scratchlm.training import PretrainModule

VOCAB = 300
SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}


def scrambled() -> nn.Module:
    """A tiny BART whose every parameter is random, LayerNorm weights included (fresh ones are 1,
    which would hide a swapped norm), so that a wrong name, split or layout shows in the logits.
    LayerNorm biases and the token table stay small: large ones make every position's argmax the
    same token, and greedy decoding would then compare nothing but a repeated id."""
    torch.manual_seed(0)
    model = build_model("bart", build_config("bart", "tiny", vocab_size=VOCAB))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name == "tok_emb.weight" or "norm" in name:
                p.copy_(0.08 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        model.logit_bias.copy_(0.05 * torch.randn_like(model.logit_bias))  # exported as final_logits_bias
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = scrambled()
    folder = export_hf(
        model, "bart", tmp_path_factory.mktemp("bart") / "hf", tokenizer_files=None, special_ids=SPECIAL, card={}
    )
    return model, folder


@pytest.fixture(scope="module")
def hf_model(exported):
    return load(exported[1])[0].eval()


def load(folder: Path, **kwargs):
    return hf_folder.load(transformers.AutoModelForSeq2SeqLM, folder, **kwargs)


def padded(batch: int, length: int, seed: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return ids, mask


# --- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_logits_match_ours_with_encoder_padding_and_decoder_masks(exported, impl):
    model, folder = exported
    assert verify_export(model, "bart", folder, attn_implementation=impl, batch=4, seq=32) < 1e-4


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
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


def test_verify_export_notices_swapped_cross_attention_keys_and_values(exported):
    model, folder = exported
    other = scrambled()
    with torch.no_grad():
        kv = other.decoder_blocks[1].cross_attn.kv.weight  # (2D, D): keys, then values
        kv.copy_(kv.roll(128, dims=0))
    assert verify_export(other, "bart", folder) > 1e-3


def test_verify_export_notices_shifted_positions(exported):
    """Our position p is HF's row p + 2; a table off by one row must not pass."""
    model, folder = exported
    other = scrambled()
    with torch.no_grad():
        table = other.decoder_embeddings.pos_emb.weight
        table.copy_(table.roll(1, dims=0))
    assert verify_export(other, "bart", folder) > 1e-3


# --- generation ----------------------------------------------------------------------------------


def test_hf_greedy_generate_equals_our_greedy_decode_for_20_tokens(exported, hf_model):
    model, _ = exported
    x, x_mask = padded(3, 12, seed=1, lengths=[12, 7, 3])
    theirs = hf_model.generate(input_ids=x, attention_mask=x_mask.long(), max_new_tokens=20, do_sample=False)
    ours = greedy_decode(model, x, x_mask, start_id=SPECIAL["eos"], max_new_tokens=20, eos_id=SPECIAL["eos"])
    assert ours.shape == (3, 21) and (ours[:, 0] == SPECIAL["eos"]).all()
    assert len(set(ours[:, 1:].flatten().tolist())) >= 6  # varied output, not one repeated id
    assert torch.equal(theirs, ours)


def test_both_stop_a_row_at_eos_and_pad_it_alike(exported, hf_model):
    """With a token the model emits mid-sequence as eos, the row stops there in both, and its
    remaining positions hold the padding token."""
    model, _ = exported
    x, x_mask = padded(3, 12, seed=1, lengths=[12, 7, 3])
    free = greedy_decode(model, x, x_mask, start_id=SPECIAL["eos"], max_new_tokens=20)
    stop = free[0, 5].item()  # what row 0 emits as its 5th token
    theirs = hf_model.generate(
        input_ids=x, attention_mask=x_mask.long(), max_new_tokens=20, do_sample=False, eos_token_id=stop
    )
    ours = greedy_decode(
        model, x, x_mask, start_id=SPECIAL["eos"], max_new_tokens=20, eos_id=stop, pad_id=SPECIAL["pad"]
    )
    assert (ours[0, 6:] == SPECIAL["pad"]).all()
    assert torch.equal(theirs, ours)


# --- the folder ----------------------------------------------------------------------------------


def test_folder_loads_into_the_stock_class_with_one_shared_embedding(exported):
    model, folder = exported
    hf, info = load(folder)
    assert type(hf) is transformers.BartForConditionalGeneration
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    shared = hf.model.shared.weight.data_ptr()
    assert hf.lm_head.weight.data_ptr() == shared
    assert hf.model.encoder.embed_tokens.weight.data_ptr() == shared
    assert hf.model.decoder.embed_tokens.weight.data_ptr() == shared
    torch.testing.assert_close(hf.final_logits_bias[0], model.logit_bias)
    # HF's position tables have two extra rows (its offset) that ours do not.
    assert hf.num_parameters() == model.num_params() + 2 * 2 * 128


def test_weights_are_written_split_and_the_embedding_once(exported):
    _, folder = exported
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        positions = f.get_tensor("model.decoder.embed_positions.weight")
    assert "lm_head.weight" not in shapes and not [n for n in shapes if "embed_tokens" in n]
    assert shapes["model.shared.weight"] == (VOCAB, 128)
    for stack in ("encoder", "decoder"):
        assert shapes[f"model.{stack}.embed_positions.weight"] == (2 + 256, 128)  # HF's offset of 2
    assert (positions[:2] == 0).all()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert shapes[f"model.decoder.layers.1.encoder_attn.{name}.weight"] == (128, 128)
        assert shapes[f"model.decoder.layers.1.encoder_attn.{name}.bias"] == (128,)
        assert shapes[f"model.encoder.layers.1.self_attn.{name}.weight"] == (128, 128)
    assert shapes["model.encoder.layers.0.fc1.weight"] == (512, 128)
    assert shapes["final_logits_bias"] == (1, VOCAB)


def test_configs_describe_the_model(exported):
    _, folder = exported
    config = hf_folder.saved_config(folder)
    assert config["architectures"] == ["BartForConditionalGeneration"] and config["model_type"] == "bart"
    assert (config["encoder_layers"], config["decoder_layers"], config["d_model"]) == (2, 2, 128)
    assert (config["encoder_attention_heads"], config["encoder_ffn_dim"], config["max_position_embeddings"]) == (
        4, 512, 256
    )
    assert config["scale_embedding"] is False and config["tie_word_embeddings"] is True
    assert config["activation_function"] == "gelu"
    assert (config["bos_token_id"], config["pad_token_id"], config["eos_token_id"]) == (0, 1, 2)
    assert config["decoder_start_token_id"] == 2
    assert config.get("forced_eos_token_id") is None and config.get("forced_bos_token_id") is None
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 2
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (0, 2, 1)
    assert "forced_eos_token_id" not in generation


# --- end to end: fit, load, generate, export --verify --------------------------------------------

# A small model and few steps; what is checked is the plumbing, not what the model learns.
BART_FIT = [
    "--model.arch", "{n_layers: 1, d_model: 64, n_heads: 2, d_ff: 128}",
    *SEQ2SEQ_FIT,
    # After 12 steps at this rate the model writes tokens before end-of-text (at 1e-3 it stops at
    # once), which gives the generation tests something to compare.
    "--model.optim.lr", "2e-3",
]


@pytest.fixture(scope="module")
def bart_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bart-run")
    recipe = str(RECIPES / "bart-tiny.yaml")
    result = run_cli("fit", "--config", recipe, "--trainer.default_root_dir", str(root), *BART_FIT)
    return Path(result.stdout.strip().splitlines()[-1]), root


def test_fit_prints_a_folder_that_loads_and_generates(bart_run):
    folder, root = bart_run
    assert folder == (root / "hf").resolve()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    assert type(model) is transformers.BartForConditionalGeneration and len(tokenizer) == 500
    specials = tuple(getattr(tokenizer, f"{role}_token") for role in ("bos", "pad", "eos", "unk", "mask"))
    assert specials == ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
    assert tokenizer.convert_tokens_to_ids(list(specials)) == [0, 1, 2, 3, 4]
    inputs = tokenizer(["The <mask> statement is used to return."], return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(inputs.input_ids[0])
    assert tokens[0] == "<s>" and tokens[-1] == "</s>" and tokens.count("<mask>") == 1
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 1 and 2 <= out.shape[1] <= 9 and out[0, 0] == tokenizer.eos_token_id
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == tokenizer.eos_token_id == 2


@pytest.mark.skipif("text2text-generation" not in SUPPORTED_TASKS, reason=TEXT2TEXT_MISSING)
def test_text2text_pipeline_writes_our_greedy_decode(bart_run):
    folder, root = bart_run
    text = "The <mask> statement is used to return."
    text2text_pipeline_is_our_greedy_decode(folder, root / "checkpoints" / "last.ckpt", text, start_role="eos")


def test_fit_validates_with_text_infilling(bart_run):
    _, root = bart_run
    lines = (root / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("val/loss")
    val = [float(row.split(",")[column]) for row in lines[1:] if row.split(",")[column]]
    assert val and all(0 < v < 6.5 for v in val)  # ln(500) = 6.2 for a uniform guess, plus slack


def test_export_verify_prints_parity_for_bart(bart_run, tmp_path, capsys):
    _, root = bart_run
    result = run_main(capsys, "export", str(root / "checkpoints" / "last.ckpt"), str(tmp_path / "export"), "--verify")
    line = next(line for line in result.stdout.splitlines() if line.startswith("max_abs_diff="))
    assert float(line.split("=")[1]) <= 1e-4
    assert result.stdout.strip().splitlines()[-1] == str((tmp_path / "export").resolve())


def test_infill_settings_reach_the_objective(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox. It jumps over the lazy dog!\n\nSpans of text come back.\n")
    tokenizer = str(train_tokenizer([str(corpus)], tmp_path / "tok", family="bart", vocab_size=300))
    arch = {"d_model": 32, "n_heads": 2, "d_ff": 64}
    module = PretrainModule(
        tokenizer, family="bart", infill=InfillConfig(mask_ratio=0.5, permute_sentences=False), arch=arch
    )
    assert module.objective.name == "infill" and module.objective.config.mask_ratio == 0.5
    assert module.objective.decoder_start_id == 2
    blocks = [{"input_ids": torch.arange(5, 45).numpy(), "doc_ids": torch.zeros(40, dtype=torch.int32).numpy()}]
    batch = module.objective.collate(blocks)
    encoder_ids = batch["input_ids"][0][batch["attention_mask"][0]]
    assert (encoder_ids != module.objective.mask_id).sum() == 20  # half of the 40 tokens masked
    assert torch.isfinite(module.objective.loss(module.model, batch)[0])
