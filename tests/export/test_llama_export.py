"""Llama -> LlamaForCausalLM: parity with padding and with packed documents, tied and untied
heads, grouped and full key/value heads, greedy generation, the written files."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open
import torch
from torch import nn
import transformers

import hf_folder
from scratchlm.export import export_hf, verify_export
from scratchlm.models import build_config, build_model

VOCAB = 300
SPECIAL = {"pad": 0, "bos": 2, "eos": 3}
CASES = {
    "tied-gqa": dict(),  # the tiny preset: 4 query heads, 2 key/value heads, tied head
    "untied-gqa": dict(tie_embeddings=False),
    "tied-mha": dict(n_kv_heads=4),
}
"""Case name -> overrides of the tiny preset (2 layers: enough to show a wrong map, and faster)."""


ROPE_THETA = 5_000.0
"""Not the default, so parity shows that the export carries it."""


def scrambled(**overrides) -> nn.Module:
    """A tiny Llama whose every parameter is random, RMSNorm weights included (fresh ones are 1,
    which would hide a swapped norm), so that a wrong name, split or layout shows in the logits."""
    torch.manual_seed(0)
    model = build_model("llama", build_config("llama", "tiny", vocab_size=VOCAB, n_layers=2, **({"rope_theta": ROPE_THETA} | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def load(folder: Path, **kwargs):
    return hf_folder.load(transformers.AutoModelForCausalLM, folder, **kwargs)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """case -> (our model, its export), written once for the module."""
    done = {}
    for case, overrides in CASES.items():
        model = scrambled(**overrides)
        folder = export_hf(
            model, "llama", tmp_path_factory.mktemp(case) / "hf", tokenizer_files=None, special_ids=SPECIAL, card={}
        )
        done[case] = model, folder
    return done


@pytest.fixture(params=sorted(CASES))
def exported(request, exports):
    return request.param, *exports[request.param]


# --- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_logits_match_ours_with_padding(exported, impl):
    _, model, folder = exported
    assert verify_export(model, "llama", folder, attn_implementation=impl, batch=4, seq=24) < 1e-4


def test_verify_export_notices_a_swapped_key_value_head(exports):
    model, folder = exports["tied-gqa"]
    other = scrambled()
    with torch.no_grad():
        keys = other.blocks[1].attn.qkv.weight[128:192]  # (G·K, D): the two key heads of block 1
        keys.copy_(keys.roll(32, dims=0))
    assert verify_export(other, "llama", folder) > 1e-3


def test_packed_documents_match_hf_given_restarting_position_ids(exports):
    """Our ``doc_ids`` compute what LlamaForCausalLM computes from position_ids that restart at
    each document (it derives the block-diagonal mask from them when there is no attention_mask
    and no cache)."""
    model, folder = exports["untied-gqa"]
    hf_model = load(folder)[0].eval()
    input_ids = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    doc_ids = torch.tensor([[0] * 6 + [1] * 3 + [2] * 7, [0] * 16])
    positions = torch.tensor([list(range(6)) + list(range(3)) + list(range(7)), list(range(16))])
    with torch.no_grad():
        ours = model.logits(model(input_ids, doc_ids=doc_ids))
        theirs = hf_model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["tied-gqa", "untied-gqa"])
def test_greedy_generation_matches_ours(exports, case):
    model, folder = exports[case]
    hf_model = load(folder)[0].eval()
    prompt = torch.tensor([[SPECIAL["bos"], 17, 42, 99, 7]])
    theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)

    ours = prompt
    with torch.no_grad():
        for _ in range(20):
            next_id = model.logits(model(ours)[:, -1]).argmax(-1, keepdim=True)
            ours = torch.cat([ours, next_id], dim=1)
            if next_id.item() == SPECIAL["eos"]:
                break
    assert ours.shape[1] > prompt.shape[1] + 5  # a real continuation, not an immediate stop
    assert torch.equal(theirs, ours)


# --- the folder ----------------------------------------------------------------------------------


def test_folder_loads_into_the_stock_class_with_the_right_tying(exported):
    case, model, folder = exported
    hf_model, info = load(folder)
    assert type(hf_model) is transformers.LlamaForCausalLM
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    out, inp = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    assert (out.data_ptr() == inp.data_ptr()) is model.config.tie_embeddings
    assert hf_model.num_parameters() == model.num_params()


def test_weights_are_written_split_and_the_tied_head_once(exported):
    _, model, folder = exported
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert ("lm_head.weight" in shapes) is not model.config.tie_embeddings
    kv_width = model.config.n_kv_heads * 32
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (128, 128)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (kv_width, 128)
    assert shapes["model.layers.1.self_attn.v_proj.weight"] == (kv_width, 128)
    assert shapes["model.layers.1.mlp.gate_proj.weight"] == shapes["model.layers.1.mlp.up_proj.weight"] == (352, 128)
    assert not [name for name in shapes if "bias" in name]


def test_configs_describe_the_model(exported):
    _, model, folder = exported
    config = hf_folder.saved_config(folder)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        4, model.config.n_kv_heads, 32
    )
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": ROPE_THETA}
    assert config["rope_theta"] == ROPE_THETA  # transformers 4's name, which 5 ignores
    assert (config["max_position_embeddings"], config["rms_norm_eps"]) == (512, 1e-5)
    assert config["tie_word_embeddings"] is model.config.tie_embeddings
    assert config["attention_bias"] is False and config["mlp_bias"] is False
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 3, 0)
