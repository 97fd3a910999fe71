"""The probes, on exported Hugging Face folders: scores, the logistic regression, fine-tuning that
learns, and causal exports that pool the last real token."""

import pytest
import torch

from scratchlm.compare.config import ProbeSpec
from scratchlm.compare.probe import classification_scores, logistic_regression, run_probes
from scratchlm.compare.probe_data import Example, ProbeSet
from scratchlm.export import export_hf
from scratchlm.models import build_config, build_model
from scratchlm.tokenizer import TokenizerInfo


def test_accuracy_and_macro_f1_by_hand():
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 0])
    scores = classification_scores(predicted, truth)
    assert scores["accuracy"] == pytest.approx(3 / 6)
    # F1: class 0 = 2·1/(2·1+2+1) = 0.4; class 1 = 2·2/(2·2+1+0) = 0.8; class 2 = 0.
    assert scores["macro_f1"] == pytest.approx((0.4 + 0.8 + 0.0) / 3)


def test_logistic_regression_separates_separable_classes_deterministically():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    y = torch.arange(3).repeat(40)
    x = centers[y] + 0.5 * torch.randn(120, 2, generator=generator)
    weight, bias = logistic_regression(x, y, 3, l2=1e-3)
    assert ((x.double() @ weight + bias).argmax(-1) == y).float().mean() > 0.97
    again = logistic_regression(x, y, 3, l2=1e-3)
    assert torch.equal(weight, again[0]) and torch.equal(bias, again[1])


def easy_probe_set() -> ProbeSet:
    """Two labels that one word tells apart: any working fine-tuning learns it."""
    animals = {"cat": "the cat sat quietly on the warm mat", "dog": "a dog ran quickly across the green park"}
    examples = [Example(f"{text} on day {i}", label) for i in range(60) for label, text in animals.items()]
    return ProbeSet(examples[:96], examples[96:], ["cat", "dog"], "two sentences")


def untrained_export(family: str, tokenizer: str, out) -> str:
    info = TokenizerInfo.load(tokenizer)
    torch.manual_seed(0)
    config = build_config(family, "tiny", vocab_size=info.vocab_size, n_layers=1, d_model=32, n_heads=2, d_ff=64)
    special = {"pad": info.pad_id, "eos": info.eos_id, "bos": info.bos_id, "mask": info.mask_id,
               "cls": info.cls_id, "sep": info.sep_id, "unk": info.unk_id}
    return export_hf(build_model(family, config), family, out, tokenizer_files=info.files(), special_ids=special, card={})


@pytest.mark.parametrize("family", ["modernbert", "modernbert-causal", "gpt2"])
def test_fine_tuning_an_exported_folder_learns_an_easy_task(family, bert_style_tokenizer, tmp_path):
    folder = untrained_export(family, bert_style_tokenizer, tmp_path / family)
    spec = ProbeSpec(epochs=6, batch_size=16, lr=3e-3, max_length=32)
    scores = run_probes(folder, easy_probe_set(), spec, seed=0, device=torch.device("cpu"))
    assert scores["finetune_accuracy"] >= 0.9, scores
    assert set(scores) == {"finetune_accuracy", "finetune_macro_f1", "linear_accuracy", "linear_macro_f1"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())


def test_a_t5_export_fine_tunes_and_gives_its_encoder_to_the_linear_probe(span_tokenizer, tmp_path):
    """T5ForSequenceClassification reads the decoder's state at each input's eos ([SEP], which the
    shared tokenizer closes every text with); T5's AutoModel would need decoder inputs, so the
    frozen features are its encoder's."""
    folder = untrained_export("t5", span_tokenizer, tmp_path / "t5")
    spec = ProbeSpec(epochs=6, batch_size=16, lr=3e-3, max_length=32)
    scores = run_probes(folder, easy_probe_set(), spec, seed=0, device=torch.device("cpu"))
    assert scores["finetune_accuracy"] >= 0.9 and scores["linear_accuracy"] >= 0.9, scores
