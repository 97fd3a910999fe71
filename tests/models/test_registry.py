from dataclasses import asdict, fields

import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.models import FAMILIES, Bert, BertConfig, GPT2, GPT2Config, build_config, build_model


def test_registry_describes_each_family():
    assert FAMILIES["bert"].causal is False and FAMILIES["bert"].objective == "mlm"
    assert FAMILIES["gpt2"].causal is True and FAMILIES["gpt2"].objective == "clm"
    assert FAMILIES["bert"].model is Bert and FAMILIES["gpt2"].config is GPT2Config


@pytest.mark.parametrize("family", ["bert", "gpt2"])  # the classic sizes; newer families test their own
def test_presets_have_the_documented_sizes(family):
    sizes = {
        size: (c.d_model, c.n_layers, c.n_heads, c.d_ff)
        for size in ("tiny", "small", "base")
        for c in [build_config(family, size, vocab_size=100)]
    }
    assert sizes == {"tiny": (128, 4, 4, 512), "small": (512, 8, 8, 2048), "base": (768, 12, 12, 3072)}
    assert build_config(family, "tiny", vocab_size=100).max_positions == 256
    base_positions = {"bert": 512, "gpt2": 1024}[family]
    assert build_config(family, "base", vocab_size=100).max_positions == base_positions


def test_every_config_field_is_documented():
    """Each field has a docstring line under it (it becomes CLI help); checked in the source."""
    import inspect

    for config in (spec.config for spec in FAMILIES.values()):
        source = inspect.getsource(config)
        for field in fields(config):
            after = source.split(f"    {field.name}:", 1)[1].splitlines()[1].strip()
            assert after.startswith('"""'), f"{config.__name__}.{field.name} has no doc"


def test_overrides_apply_and_round_trip():
    config = build_config("gpt2", "tiny", vocab_size=500, n_layers=2, dropout=0.0)
    assert (config.n_layers, config.dropout, config.d_model, config.vocab_size) == (2, 0.0, 128, 500)
    assert GPT2Config(**asdict(config)) == config  # checkpoints rebuild configs this way
    assert isinstance(build_model("gpt2", config), GPT2)


def test_unknown_family_is_named_with_the_choices():
    with pytest.raises(ScratchLMError, match=r"'llama2'.*\['bart', 'bert', 'gpt2', 'llama'"):
        build_config("llama2", vocab_size=100)


def test_unknown_size_is_named_with_the_choices():
    with pytest.raises(ScratchLMError, match=r"'huge'.*tiny.*small.*base"):
        build_config("bert", "huge", vocab_size=100)


def test_unknown_override_is_named_with_the_valid_fields():
    with pytest.raises(ScratchLMError, match=r"n_layer\b.*valid fields: d_model, n_layers"):
        build_config("gpt2", vocab_size=100, n_layer=3)


def test_heads_must_divide_the_width():
    with pytest.raises(ScratchLMError, match=r"d_model=100 is not divisible by model.arch.n_heads=3"):
        build_config("bert", vocab_size=100, d_model=100, n_heads=3)


@pytest.mark.parametrize(
    "field, value",
    [("n_layers", 0), ("d_ff", -1), ("vocab_size", 0), ("max_positions", 2.5), ("dropout", 1.0), ("norm_eps", 0.0)],
)
def test_bad_fields_are_named(field, value):
    with pytest.raises(ScratchLMError, match=rf"model\.arch\.{field}="):
        GPT2Config(**{"vocab_size": 100, field: value})


def test_bert_type_vocab_must_be_positive():
    with pytest.raises(ScratchLMError, match="type_vocab_size"):
        BertConfig(vocab_size=100, type_vocab_size=0)


def test_build_model_refuses_another_familys_config():
    with pytest.raises(ScratchLMError, match="not a bert config"):
        build_model("bert", GPT2Config(vocab_size=100))
