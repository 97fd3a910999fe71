"""ModernBERT -> ModernBertForMaskedLM and its causal twin -> ModernBertDecoderForCausalLM."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn
import transformers

from hf_folder import load, saved_config
from scratchlm.errors import ScratchLMError
from scratchlm.export import check_exportable, export_hf, hf_auto_class, verify_export
from scratchlm.export.modernbert import TRANSFORMERS_MAJOR, causal_hf_config, hf_config, token_ids
from scratchlm.models import build_config, build_model
from scratchlm.models.layers import positions_in_documents

VOCAB = 300
BERT_STYLE = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
GPT_STYLE = {"eos": 0, "bos": 0, "pad": 1}
SPECIAL = {"modernbert": BERT_STYLE, "modernbert-causal": GPT_STYLE}
HF_CLASS = {"modernbert": "ModernBertForMaskedLM", "modernbert-causal": "ModernBertDecoderForCausalLM"}
SEQ = 150
"""Past the tiny preset's local window (64): the local blocks' band is in force in every check."""
ROPE = {"global_rope_theta": 80_000.0, "local_rope_theta": 20_000.0}
"""Not the defaults, so parity shows that the export carries them."""


def rope(family: str) -> dict[str, float]:
    """The RoPE thetas of the test models: transformers 4's decoder takes one theta for every
    layer, so there the causal model gets one (see ``check_causal_exportable``)."""
    if family == "modernbert-causal" and TRANSFORMERS_MAJOR < 5:
        return {name: ROPE["global_rope_theta"] for name in ROPE}
    return ROPE


def scrambled(family: str, **overrides) -> nn.Module:
    """A tiny model whose every parameter is random, so that a wrong or missing name, layout or
    split in the export shows in the logits (fresh norms are 1 and the output bias 0, which would
    hide a swapped norm or a dropped bias)."""
    torch.manual_seed(0)
    model = build_model(family, build_config(family, "tiny", vocab_size=VOCAB, **(rope(family) | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """family -> (our model, its export), written once for the module."""
    done = {}
    for family in SPECIAL:
        model = scrambled(family)
        folder = tmp_path_factory.mktemp(family) / "hf"
        export_hf(model, family, folder, tokenizer_files=None, special_ids=SPECIAL[family], card={"steps": 3})
        done[family] = model, folder
    return done


@pytest.fixture(params=list(SPECIAL))
def exported(request, exports):
    return request.param, *exports[request.param]


# --- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_logits_match_ours_with_padding_past_the_local_window(exported, impl):
    family, model, folder = exported
    assert verify_export(model, family, folder, attn_implementation=impl, batch=3, seq=SEQ) < 1e-4


@pytest.mark.parametrize(
    "overrides",
    [dict(local_window=128), dict(global_every=2), dict(global_rope_theta=10_000.0, local_rope_theta=160_000.0)],
    ids=["window", "global_every", "rope_thetas"],
)
def test_each_attention_setting_reaches_the_hf_config(exported, overrides):
    """The same weights under another window, layer pattern or RoPE bases no longer match the
    folder: the HF model really runs the setting we export."""
    family, model, folder = exported
    other = scrambled(family, **overrides)
    other.load_state_dict(model.state_dict())
    assert verify_export(other, family, folder, batch=2, seq=SEQ) > 1e-3


def test_verify_export_notices_a_wrong_weight(exported):
    family, model, folder = exported
    other = scrambled(family)
    with torch.no_grad():
        other.blocks[1].attn_norm.weight[0] += 1.0  # one scale of one norm of one block
    assert verify_export(other, family, folder, batch=2, seq=SEQ) > 1e-3


def test_causal_greedy_generation_matches_ours_past_the_window(exports):
    """A 40-token prompt and 20 new tokens run past the twin's 32-token window, so HF's
    sliding-window cache is exercised."""
    model, folder = exports["modernbert-causal"]
    hf_model, _ = load(transformers.AutoModelForCausalLM, folder)
    prompt = torch.randint(2, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    theirs = hf_model.eval().generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False
    )

    ours = prompt
    with torch.no_grad():
        for _ in range(20):
            next_id = model.logits(model(ours)[:, -1]).argmax(-1, keepdim=True)
            ours = torch.cat([ours, next_id], dim=1)
            if next_id.item() == GPT_STYLE["eos"]:
                break
    assert ours.shape[1] > prompt.shape[1] + 5  # a real continuation, not an immediate stop
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causal_packed_documents_match_hf_given_restarting_positions(exports, impl):
    """HF's decoder reads packed documents from position_ids that restart at 0 (with no
    attention_mask and no cache); our doc_ids give the same logits."""
    model, folder = exports["modernbert-causal"]
    hf_model, _ = load(transformers.AutoModelForCausalLM, folder, attn_implementation=impl)
    x = torch.randint(VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(4))
    doc_ids = torch.tensor([[0] * 60 + [1] * 90])
    with torch.no_grad():
        ours = model.logits(model(x, doc_ids=doc_ids))
        theirs = hf_model.eval()(input_ids=x, position_ids=positions_in_documents(doc_ids), use_cache=False).logits
    assert (ours - theirs).abs().max().item() < 1e-4


# --- loading -------------------------------------------------------------------------------------


def test_folder_loads_into_the_stock_class_with_tied_weights(exported):
    family, model, folder = exported
    auto = getattr(transformers, hf_auto_class(family))
    hf_model, info = load(auto, folder)
    assert type(hf_model).__name__ == HF_CLASS[family]
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    out, inp = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    assert out.data_ptr() == inp.data_ptr()
    assert hf_model.num_parameters() == model.num_params()


def test_config_carries_the_architecture_and_special_ids(exported):
    family, _, folder = exported
    config = saved_config(folder)
    assert config["architectures"] == [HF_CLASS[family]]
    assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    thetas = rope(family)
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == thetas["global_rope_theta"]
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == thetas["local_rope_theta"]
    # under transformers 4's names too, which 4 reads and 5 ignores
    assert (config["global_rope_theta"], config["local_rope_theta"]) == tuple(thetas.values())
    assert (config["local_attention"], config["norm_bias"], config["tie_word_embeddings"]) == (64, False, True)
    generation = folder / "generation_config.json"
    if family == "modernbert":
        # A BERT-style tokenizer: [CLS] and [SEP] stand in for bos and eos, as in ModernBERT's own config.
        assert [config[f"{k}_token_id"] for k in ("pad", "cls", "sep", "bos", "eos")] == [0, 2, 3, 2, 3]
        assert not generation.exists()
    else:
        # A GPT-style tokenizer: end-of-text is bos, eos, cls and sep; padding is its own token.
        assert [config[f"{k}_token_id"] for k in ("pad", "cls", "sep", "bos", "eos")] == [1, 0, 0, 0, 0]
        saved = json.loads(generation.read_text())
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (0, 0, 1)


def test_encoder_loads_for_sequence_classification_with_only_the_classifier_new(exports):
    model, folder = exports["modernbert"]
    classifier, info = load(transformers.AutoModelForSequenceClassification, folder, num_labels=3)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert info["unexpected_keys"] == {"decoder.bias"}  # the MLM output bias, unused there
    input_ids = torch.randint(VOCAB, (2, 10))
    with torch.no_grad():
        logits = classifier.eval()(input_ids=input_ids).logits
        hidden = classifier.model(input_ids=input_ids).last_hidden_state
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    torch.testing.assert_close(hidden, model(input_ids), atol=1e-4, rtol=1e-4)  # the backbone is ours


def test_causal_model_with_two_thetas_is_refused_before_training_only_under_transformers_4():
    config = build_config("modernbert-causal", "tiny", vocab_size=VOCAB, **ROPE)
    if TRANSFORMERS_MAJOR >= 5:
        check_exportable("modernbert-causal", config)
    else:
        with pytest.raises(ScratchLMError, match="local_rope_theta=20000.0 differs .* transformers>=5.1,"):
            check_exportable("modernbert-causal", config)
    check_exportable("modernbert", config)  # the encoder class reads both thetas in every release


def test_token_ids_fall_back_between_pairs_only():
    assert token_ids({"pad": 0, "cls": 2, "sep": 3}) == dict(
        pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3
    )
    assert token_ids({"pad": 1, "bos": 5, "eos": 6, "cls": 7, "sep": 8})["bos_token_id"] == 5
    config = build_config("modernbert", "tiny", vocab_size=VOCAB)
    assert hf_config(config, {}).pad_token_id is None  # the encoder's config takes missing ids
    with pytest.raises(ScratchLMError, match=r"needs token ids for bos_token_id, eos_token_id"):
        causal_hf_config(config, {"pad": 0})  # the decoder's does not
