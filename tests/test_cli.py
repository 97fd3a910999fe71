"""The command line, end to end: fit prints an HF folder that transformers uses; export; bad input."""

import gzip
import json
import math
from pathlib import Path
import subprocess
import sys

import pytest

from runs import RECIPES, error_line, mean_next_token_loss, run_cli, run_main, zen_of_python
from scratchlm.cli import main


def test_fit_gpt2_prints_a_folder_transformers_generates_from(gpt2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder, root, result = gpt2_run
    assert folder == (root / "hf").resolve() and folder.is_dir()
    for name in ("config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json"):
        assert (folder / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    loss = mean_next_token_loss(model, tokenizer, zen_of_python())
    # A uniform guess scores ln(V); this 2-layer model trains for seconds, the recipe for minutes.
    assert loss < math.log(len(tokenizer)) - 1.0, f"held-out loss {loss:.2f} is near a uniform guess"
    # What the tokenizer returns goes into the model as it is: no token type ids, which GPT-2 would
    # add as token embeddings (transformers 4's tokenizers return them unless the folder says not).
    assert set(tokenizer("The for statement")) == {"input_ids", "attention_mask"}
    text = pipeline("text-generation", model=str(folder))("The for statement", max_new_tokens=8)
    assert text[0]["generated_text"].startswith("The for statement")


def test_fit_writes_logs_checkpoints_and_tokenizer_under_the_run_dir(gpt2_run):
    _, root, _ = gpt2_run
    metrics = next(root.glob("logs/version_*/metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    for column in ("train/loss", "train/tok_s", "train/tflops", "val/loss", "val/ppl", "train/lr", "train/grad_norm"):
        assert column in header, column
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    # One version folder per start, as the README's table says: the CSV metrics, the TensorBoard
    # events and the config side by side.
    assert sorted(p.name for p in (root / "logs").iterdir()) == ["curves.png", "version_0"]
    assert {"metrics.csv", "config.yaml"} <= {p.name for p in (root / "logs" / "version_0").iterdir()}
    assert list(root.glob("logs/version_0/events.out.tfevents.*"))


def test_fit_bert_gives_fill_mask_and_a_classifier_backbone(bert_run):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline

    folder, _, _ = bert_run
    AutoModelForMaskedLM.from_pretrained(folder)
    fill = pipeline("fill-mask", model=str(folder))
    predictions = fill(f"The {fill.tokenizer.mask_token} statement is used to loop.")
    assert len(predictions) == 5 and all("token_str" in p for p in predictions)
    assert set(fill.tokenizer("a", "b")) == {"input_ids", "token_type_ids", "attention_mask"}  # BERT's segments
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=3, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    # Only the MLM head goes unused, as for any BERT MLM checkpoint.
    assert all(key.startswith("cls.predictions.") for key in info["unexpected_keys"])
    assert not info["mismatched_keys"]


def test_export_verify_prints_parity_and_refuses_a_non_empty_folder(gpt2_run, tmp_path, capsys):
    _, root, _ = gpt2_run
    out = tmp_path / "export"
    result = run_main(capsys, "export", str(root / "checkpoints" / "last.ckpt"), str(out), "--verify")
    line = next(l for l in result.stdout.splitlines() if l.startswith("max_abs_diff="))
    assert float(line.split("=")[1]) <= 1e-4
    again = run_main(capsys, "export", str(root / "checkpoints" / "last.ckpt"), str(out), check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


NOT_TRAINING = """
import sys

def loaded(*packages):
    return sorted(p for p in packages if p in sys.modules)

import scratchlm, scratchlm.cli
print(loaded("torch", "transformers", "lightning", "torchmetrics"))
from scratchlm.cli import main
tokenizer, checkpoint, out = sys.argv[1:]
main(["tokenizer", "train", "--vocab-size", "300", "--out", tokenizer])
main(["prepare", "--tokenizer", tokenizer, "--out", out + "-prepared"])
main(["export", checkpoint, out])
print(loaded("lightning", "torchmetrics"))
"""


def test_the_commands_that_do_not_train_never_import_lightning(gpt2_run, tmp_path):
    """Importing Lightning takes seconds (torchmetrics brings scipy and more): tokenizer, prepare
    and export run without it, and ``scratchlm --help`` imports neither PyTorch nor transformers."""
    _, root, _ = gpt2_run
    result = subprocess.run(
        [sys.executable, "-c", NOT_TRAINING, str(tmp_path / "tok"), str(root / "checkpoints" / "last.ckpt"),
         str(tmp_path / "export")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "[]" and lines[-1] == "[]", result.stdout
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_help_lists_every_command_and_an_unknown_one_is_named(capsys):
    from scratchlm import __version__
    from scratchlm.cli import COMMANDS

    main(["--help"])
    listed = capsys.readouterr().out
    assert all(f"\n  {name} " in listed for name in COMMANDS), listed
    main(["--version"])
    assert capsys.readouterr().out == f"scratchlm {__version__}\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2 and "scratchlm: error: no command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(RECIPES / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "trainer:" in printed
    header = (RECIPES / recipe).read_text().splitlines()[0]
    assert header.startswith("#"), "a recipe opens with a comment: what it trains, what it reaches"


def write_bad_inputs(folder: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (fit arguments, substrings the error must contain)."""
    folder.mkdir()
    empty = folder / "empty.txt"
    empty.write_text("")
    latin1 = folder / "latin1.txt"
    latin1.write_bytes("first paragraph\n\ncaf\xe9 au lait\n".encode("latin-1"))
    broken = folder / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "oops"\n')
    nofield = folder / "nofield.jsonl"
    nofield.write_text('{"body": "no text field here"}\n')
    packed = folder / "packed.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(json.dumps({"text": "fine"}) + "\n")
    return {
        "empty": ([str(empty)], ["empty.txt"]),
        "not-utf8": ([str(latin1)], ["latin1.txt", ":3", "UTF-8"]),
        "bad-json": ([str(broken)], ["broken.jsonl", ":2"]),
        "no-field": ([str(nofield)], ["nofield.jsonl", ":1", "text"]),
        "no-match": ([str(folder / "nothing-*.txt")], ["nothing-*.txt"]),
    }


def bad_input_fit(tmp_path: Path, case: str) -> tuple[list[str], list[str]]:
    """(fit arguments, substrings its one error line must hold) for one of ``write_bad_inputs``'s cases."""
    paths, expected = write_bad_inputs(tmp_path / "data")[case]
    args = ["fit", "--config", str(RECIPES / "gpt2-tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--data.paths", json.dumps(paths)]
    return args, expected


def assert_one_clear_line(result, expected: list[str]) -> None:
    line = error_line(result)
    for text in expected:
        assert text in line, line


@pytest.mark.parametrize("case", ["empty", "not-utf8", "bad-json", "no-field", "no-match"])
def test_bad_input_stops_with_one_clear_line(case, tmp_path, capsys):
    args, expected = bad_input_fit(tmp_path, case)
    assert_one_clear_line(run_main(capsys, *args, check=False), expected)


def test_bad_input_stops_the_real_command_with_exit_code_2(tmp_path):
    """The same through a process of its own: its exit status and its whole stderr."""
    args, expected = bad_input_fit(tmp_path, "not-utf8")
    assert_one_clear_line(run_cli(*args, check=False), expected)


def test_fit_runs_under_two_process_ddp(tmp_path):
    """Lightning's own DDP on two CPU processes (gloo): both ranks train, validate, and rank 0 exports."""
    result = run_cli(
        "fit", "--config", str(RECIPES / "gpt2-tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.enable_progress_bar", "false", "--tokenizer.vocab_size", "500",
        "--model.arch", "{n_layers: 1, d_model: 32, n_heads: 2, d_ff: 64}",
    )
    assert result.stdout.strip().splitlines()[-1] == str((tmp_path / "hf").resolve())
    metrics = next(tmp_path.glob("logs/version_*/metrics.csv")).read_text()
    assert "val/loss" in metrics.splitlines()[0]


def test_a_bad_line_found_while_training_is_reported_cleanly(gpt2_run, tmp_path, capsys):
    """With a tokenizer given, nothing reads the corpus before training; the error comes from the
    stream, mid-run, and must still be one line naming the file and line."""
    _, root, _ = gpt2_run
    corpus = tmp_path / "late.jsonl"
    lines = [json.dumps({"text": f"document number {i} is fine."}) for i in range(200)]
    corpus.write_text("\n".join(lines[:150] + ['{"text": broken'] + lines[150:]) + "\n")
    result = run_main(
        capsys, "fit", "--config", str(RECIPES / "gpt2-tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.paths", str(corpus), "--data.tokenizer", str(root / "tokenizer"), "--data.num_workers", "1",
        "--trainer.max_steps", "50", "--trainer.enable_progress_bar", "false", "--data.val_fraction", "0",
        check=False,
    )
    assert "late.jsonl:151" in error_line(result), result.stderr


def test_tokenizer_train_says_when_the_corpus_gives_fewer_tokens_than_asked(tmp_path, capsys):
    main(["tokenizer", "train", "--vocab-size", "60000", "--out", str(tmp_path / "tok")])
    captured = capsys.readouterr()
    assert captured.out.strip() == str((tmp_path / "tok").resolve())
    got = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert f"the tokenizer has {len(got)}" in captured.err and "fewer than the 60000 asked" in captured.err
