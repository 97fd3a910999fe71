"""Encoder-decoders through the real command: a T5 tokenizer with sentinels, a short t5 fit whose
folder loads in transformers and generates, export --verify; the training module's wiring."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.pipelines import SUPPORTED_TASKS

from runs import RECIPES, SEQ2SEQ_FIT, TEXT2TEXT_MISSING, run_cli, run_main, text2text_pipeline_is_our_greedy_decode
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import train_tokenizer
from scratchlm.training import PretrainModule

# A small model and few steps; what is checked is the plumbing, not what the model learns.
T5_FIT = [
    "--model.arch", "{n_layers: 2, n_decoder_layers: 2, d_model: 64, n_heads: 4, d_ff: 128}",
    "--tokenizer.sentinels", "20",
    *SEQ2SEQ_FIT,
]


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5-run")
    result = run_cli("fit", "--config", str(RECIPES / "t5-tiny.yaml"), "--trainer.default_root_dir", str(root), *T5_FIT)
    return Path(result.stdout.strip().splitlines()[-1]), root, result


def test_fit_prints_a_folder_that_loads_and_generates(t5_run):
    folder, root, _ = t5_run
    assert folder == (root / "hf").resolve()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "T5ForConditionalGeneration" and len(tokenizer) == 500
    inputs = tokenizer(["The <extra_id_0> statement is used to <extra_id_1>."], return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(inputs.input_ids[0]).count("<extra_id_0>") == 1
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 1 and 2 <= out.shape[1] <= 9 and out[0, 0] == tokenizer.pad_token_id
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == tokenizer.pad_token_id == 0


def test_fit_validates_with_span_corruption(t5_run):
    _, root, _ = t5_run
    lines = (root / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    column = header.index("val/loss")
    val = [float(row.split(",")[column]) for row in lines[1:] if row.split(",")[column]]
    assert val and all(0 < v < 7.0 for v in val)  # below ln(500) = 6.2 plus slack: it learned something


@pytest.mark.skipif("text2text-generation" not in SUPPORTED_TASKS, reason=TEXT2TEXT_MISSING)
def test_text2text_pipeline_writes_our_greedy_decode(t5_run):
    folder, root, _ = t5_run
    text = "The <extra_id_0> statement is used to <extra_id_1>."
    text2text_pipeline_is_our_greedy_decode(folder, root / "checkpoints" / "last.ckpt", text, start_role="pad")


def test_export_verify_prints_parity_for_t5(t5_run, tmp_path, capsys):
    _, root, _ = t5_run
    result = run_main(capsys, "export", str(root / "checkpoints" / "last.ckpt"), str(tmp_path / "export"), "--verify")
    line = next(l for l in result.stdout.splitlines() if l.startswith("max_abs_diff="))
    assert float(line.split("=")[1]) <= 1e-4
    assert result.stdout.strip().splitlines()[-1] == str((tmp_path / "export").resolve())


def test_tokenizer_train_with_sentinels(tmp_path, capsys):
    out = tmp_path / "tok"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("span corruption hides spans of text\n\nthe decoder writes them back\n" * 20)
    result = run_main(
        capsys, "tokenizer", "train", "--data", str(corpus), "--family", "t5", "--kind", "unigram",
        "--vocab-size", "150", "--sentinels", "100", "--out", str(out),
    )
    assert result.stdout.strip() == str(out.resolve())
    tokenizer = AutoTokenizer.from_pretrained(out)
    top = len(tokenizer) - 1  # <= 149: Unigram keeps fewer pieces than asked of so small a corpus
    assert top <= 149 and tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [top, top - 99]
    ids = tokenizer("hides <extra_id_3> text").input_ids
    assert ids.count(top - 3) == 1 and ids[-1] == tokenizer.eos_token_id


def test_tokenizer_train_refuses_a_vocabulary_the_sentinels_fill(tmp_path, capsys):
    result = run_main(
        capsys, "tokenizer", "train", "--family", "t5", "--vocab-size", "100", "--out", str(tmp_path / "tok"), check=False
    )
    assert result.returncode == 2 and "vocab_size=100" in result.stderr and "Traceback" not in result.stderr


# --- the training module's wiring ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n\nspans of text\n")
    return str(train_tokenizer([str(corpus)], corpus.parent / "tok", family="t5", vocab_size=80, sentinels=10))


@pytest.mark.parametrize(
    "family, objective, message",
    [
        ("t5", "mlm", "model.objective=mlm does not fit model.family=t5"),
        ("t5", "clm", "model.objective=clm does not fit model.family=t5"),
        ("gpt2", "span", "model.objective=span does not fit model.family=gpt2"),
    ],
)
def test_objectives_and_families_must_match(t5_tokenizer, family, objective, message):
    with pytest.raises(ScratchLMError, match=message):
        PretrainModule(t5_tokenizer, family=family, objective=objective, arch={"d_model": 32, "n_heads": 2})


def test_document_masks_are_refused_for_t5(t5_tokenizer):
    with pytest.raises(ScratchLMError, match="model.document_masks is not supported for t5"):
        PretrainModule(t5_tokenizer, family="t5", document_masks=True)


def test_block_lengths_are_checked_as_encoder_and_decoder_lengths(t5_tokenizer):
    module = PretrainModule(t5_tokenizer, family="t5", arch={"d_model": 32, "n_heads": 2, "d_ff": 64})
    assert module.objective.name == "span"
    assert module.sequence_lengths(64) == (58, 14)  # 64 tokens: 10 hidden in 3 spans
    with pytest.raises(ScratchLMError, match=r"data\.block_size=256 makes 13 masked spans.*only 10 sentinels"):
        module.sequence_lengths(256)


def test_span_settings_reach_the_objective(t5_tokenizer):
    from scratchlm.objectives import SpanConfig

    module = PretrainModule(
        t5_tokenizer, family="t5", span=SpanConfig(noise_density=0.3, mean_span_length=2.0),
        arch={"d_model": 32, "n_heads": 2, "d_ff": 64},
    )
    assert module.sequence_lengths(40) == (40 - 12 + 6 + 1, 12 + 6 + 1)
    batch = module.objective.collate(
        [{"input_ids": (torch.arange(40) % 5 + 3).numpy(), "doc_ids": torch.zeros(40, dtype=torch.int32).numpy()}]
    )
    loss, _ = module.objective.loss(module.model, batch)
    assert torch.isfinite(loss)
