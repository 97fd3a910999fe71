import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn
import transformers

from hf_folder import load, saved_config
from scratchlm.errors import ScratchLMError
from scratchlm.export import export_hf, hf_auto_class, verify_export
import scratchlm.export.hf as hf
from scratchlm.models import build_config, build_model

VOCAB = 300
SPECIAL = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, "cls": 5, "sep": 6}
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0", "note": "stand-in"}\n', "tokenizer_config.json": "{}\n"}
CARD = {"family": "x", "objective": "clm", "corpus": "unit-test text", "steps": 7, "tokens_seen": 1234}


def scrambled(family: str) -> nn.Module:
    """A tiny model whose every parameter is random, so that a wrong or missing name, layout or
    split in the export shows in the logits (fresh biases are 0 and norms 1, which would hide
    a swapped bias or norm)."""
    torch.manual_seed(0)
    model = build_model(family, build_config(family, "tiny", vocab_size=VOCAB))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def export(model, family, out_dir, **kwargs) -> Path:
    return export_hf(
        model, family, out_dir, tokenizer_files=TOKENIZER_FILES, special_ids=SPECIAL, card=CARD, **kwargs
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """family -> (our model, its export), written once for the module."""
    done = {}
    for family in ("bert", "gpt2"):
        model = scrambled(family)
        done[family] = model, export(model, family, tmp_path_factory.mktemp(family) / "hf")
    return done


@pytest.fixture(params=["bert", "gpt2"])
def exported(request, exports):
    return request.param, *exports[request.param]


# --- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_logits_match_ours_with_padding(exported, impl):
    family, model, folder = exported
    assert verify_export(model, family, folder, attn_implementation=impl, batch=4, seq=24) < 1e-4


def test_verify_export_notices_a_wrong_weight(exported):
    family, model, folder = exported
    other = scrambled(family)
    with torch.no_grad():
        other.blocks[1].attn.qkv.bias[0] += 1.0  # one query bias of one head of one block
    assert verify_export(other, family, folder) > 1e-3


def test_gpt2_greedy_generation_matches_ours(exports):
    model, folder = exports["gpt2"]
    hf_model, _ = load(transformers.AutoModelForCausalLM, folder)
    prompt = torch.tensor([[SPECIAL["bos"], 17, 42, 99, 7]])
    theirs = hf_model.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)

    ours = prompt
    with torch.no_grad():
        for _ in range(20):
            next_id = model.logits(model(ours)[:, -1]).argmax(-1, keepdim=True)
            ours = torch.cat([ours, next_id], dim=1)
            if next_id.item() == SPECIAL["eos"]:
                break
    assert ours.shape[1] > prompt.shape[1] + 5  # a real continuation, not an immediate stop
    assert torch.equal(theirs, ours)


# --- loading -------------------------------------------------------------------------------------


def test_folder_loads_into_the_stock_class_with_tied_weights(exported):
    family, model, folder = exported
    auto = getattr(transformers, hf_auto_class(family))
    hf_model, info = load(auto, folder)
    assert type(hf_model).__name__ == {"bert": "BertForMaskedLM", "gpt2": "GPT2LMHeadModel"}[family]
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    # BERT's MLM class has no pooler; the pooler we write for fine-tuning is its only surprise.
    expected_unexpected = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} if family == "bert" else set()
    assert info["unexpected_keys"] == expected_unexpected
    out, inp = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    assert out.data_ptr() == inp.data_ptr()
    assert hf_model.num_parameters() == model.num_params()


def test_tied_tensors_are_written_once(exported):
    family, _, folder = exported
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "cls.predictions.decoder.weight" not in names
    assert {"transformer.wte.weight", "bert.embeddings.word_embeddings.weight"} & names


def test_configs_carry_the_special_ids(exported):
    family, _, folder = exported
    config = saved_config(folder)
    assert config["architectures"] == [{"bert": "BertForMaskedLM", "gpt2": "GPT2LMHeadModel"}[family]]
    assert config["pad_token_id"] == SPECIAL["pad"] and config["tie_word_embeddings"] is True
    generation = folder / "generation_config.json"
    if family == "gpt2":
        saved = json.loads(generation.read_text())
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (2, 3, 0)
        assert (config["bos_token_id"], config["eos_token_id"]) == (2, 3)
    else:
        assert not generation.exists()


def test_tokenizer_files_and_card_are_written(exported):
    family, _, folder = exported
    for name, text in TOKENIZER_FILES.items():
        written = (folder / name).read_text()
        if name == "tokenizer_config.json":
            # capped at the model's positions, so HF truncates instead of indexing past them, and
            # naming the inputs the model takes
            inputs = {"bert": ["input_ids", "token_type_ids", "attention_mask"], "gpt2": ["input_ids", "attention_mask"]}
            assert json.loads(written) == {**json.loads(text), "model_max_length": 256, "model_input_names": inputs[family]}
        else:
            assert written == text
    readme = (folder / "README.md").read_text()
    assert f"{hf_auto_class(family)}.from_pretrained(path)" in readme and "| Optimizer steps | 7 |" in readme


def test_verify_batches_are_right_padded_rows_of_different_lengths():
    input_ids, mask = hf.padded_batch(VOCAB, batch=4, seq=16, seed=0)
    assert input_ids.shape == mask.shape == (4, 16)
    assert mask[0].all() and not mask[1:, -1].any()
    assert torch.equal(mask, mask.cummin(dim=1).values)  # real tokens first, then padding only


def test_a_compiled_model_exports_under_its_own_names(tmp_path):
    model = scrambled("gpt2")
    folder = export(torch.compile(model), "gpt2", tmp_path / "hf")  # names gain "_orig_mod."
    assert verify_export(model, "gpt2", folder) < 1e-4


def test_bert_loads_for_sequence_classification_with_only_the_classifier_new(exports):
    model, folder = exports["bert"]
    classifier, info = load(transformers.AutoModelForSequenceClassification, folder, num_labels=3)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert all(k.startswith("cls.predictions.") for k in info["unexpected_keys"])  # the MLM head, unused
    input_ids = torch.randint(VOCAB, (2, 10))
    with torch.no_grad():
        logits = classifier.eval()(input_ids=input_ids).logits
        pooled = classifier.bert(input_ids=input_ids).pooler_output
        hidden = model(input_ids)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    torch.testing.assert_close(pooled, torch.tanh(hidden[:, 0]), atol=1e-4, rtol=1e-4)  # identity pooler


# --- the folder as a whole ----------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_non_empty_folder_is_refused_without_overwrite(tmp_path):
    model = scrambled("gpt2")
    out = tmp_path / "hf"
    export(model, "gpt2", out)
    before = snapshot(out)
    with pytest.raises(ScratchLMError, match=r"holds an export; pass --overwrite to replace it, or choose another folder"):
        export(scrambled("gpt2"), "gpt2", out)
    assert snapshot(out) == before

    changed = scrambled("gpt2")
    with torch.no_grad():
        changed.tok_emb.weight.mul_(2)
    export(changed, "gpt2", out, overwrite=True)  # a previous export is replaced whole
    assert snapshot(out) != before and verify_export(changed, "gpt2", out) < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no staging or old folder left behind


@pytest.mark.parametrize("foreign", ["notes.txt", "checkpoints/last.ckpt", "run.json"])
def test_overwrite_never_deletes_what_an_export_did_not_write(tmp_path, foreign):
    """A run folder (checkpoints, run.json) or a folder of the user's own files given as the
    export's destination, with --overwrite: refused, everything left as it was."""
    out = tmp_path / "hf"
    export(scrambled("gpt2"), "gpt2", out)
    (out / foreign).parent.mkdir(exist_ok=True)
    (out / foreign).write_text("mine")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ScratchLMError, match=rf"holds files that are not an export's \({foreign.split('/')[0]}"):
        export(scrambled("gpt2"), "gpt2", out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_an_existing_empty_folder_is_fine(tmp_path):
    (tmp_path / "hf").mkdir()
    assert (export(scrambled("bert"), "bert", tmp_path / "hf") / "config.json").exists()


def test_failure_mid_write_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    model = scrambled("gpt2")
    export(model, "gpt2", out)
    before = snapshot(out)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "save_file", disk_full)
    changed = scrambled("gpt2")
    with torch.no_grad():
        changed.tok_emb.weight.mul_(2)
    with pytest.raises(OSError, match="No space left"):
        export(changed, "gpt2", out, overwrite=True)

    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert verify_export(model, "gpt2", out) < 1e-4  # still loads, still the first model


def test_special_id_outside_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(ScratchLMError, match=r"special_ids\['eos'\]=300 is outside"):
        export_hf(scrambled("gpt2"), "gpt2", tmp_path / "hf", tokenizer_files=None,
                  special_ids={"eos": 300}, card={})
    assert not (tmp_path / "hf").exists()


def test_tokenizer_file_may_not_escape_or_replace_the_export(tmp_path):
    for name in ("../evil.json", "config.json"):
        with pytest.raises(ScratchLMError, match="tokenizer file name"):
            export_hf(scrambled("gpt2"), "gpt2", tmp_path / "hf", tokenizer_files={name: "{}"},
                      special_ids={}, card={})


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ScratchLMError, match="unknown"):
        export_hf(scrambled("gpt2"), "llama2", tmp_path / "hf", tokenizer_files=None, special_ids={}, card={})
