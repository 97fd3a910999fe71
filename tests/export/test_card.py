from scratchlm.export.card import model_card
from scratchlm.models import build_config


def card(family: str, auto_class: str, facts: dict) -> str:
    return model_card(
        family=family,
        hf_class={"bert": "BertForMaskedLM", "gpt2": "GPT2LMHeadModel"}[family],
        auto_class=auto_class,
        config=build_config(family, "tiny", vocab_size=300),
        num_params=1_234_567,
        num_params_non_embedding=1_000_000,
        card=facts,
    )


def test_card_reports_the_run_and_how_to_load():
    text = card(
        "gpt2",
        "AutoModelForCausalLM",
        {"objective": "clm", "corpus": "my.txt", "steps": 150, "tokens_seen": 153600, "val_loss": 3.21987, "val_ppl": None},
    )
    assert text.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "| Parameters | 1,234,567 |" in text
    assert "| d_model | 128 |" in text
    assert "| Corpus | my.txt |" in text and "| Tokens seen | 153,600 |" in text
    assert "| Final validation loss | 3.22 |" in text
    assert "perplexity" not in text  # a None fact is left out
    assert "AutoModelForCausalLM.from_pretrained(path)" in text
    assert 'pipeline("text-generation"' in text


def test_bert_card_uses_the_mlm_class_and_explains_fine_tuning():
    text = card("bert", "AutoModelForMaskedLM", {"custom|fact": "a | b\nc"})
    assert "AutoModelForMaskedLM.from_pretrained(path)" in text and 'pipeline("fill-mask"' in text
    assert "AutoModelForSequenceClassification" in text
    assert "| custom|fact | a \\| b c |" in text  # unknown keys still appear, one line, escaped


def test_card_without_training_facts_has_no_training_section():
    assert "## Training" not in card("gpt2", "AutoModelForCausalLM", {})
