"""The catalogue of bad input to ``scratchlm fit``: each stops with one line that names the culprit
and says what to do, exits non-zero, and damages nothing written before.

(Bad corpus files are also covered one by one in ``tests/data/test_sources.py``, a document
longer than a block in ``tests/data/test_packing.py``, and the five commonest in
``tests/test_cli.py``, one of them through a real subprocess.)
"""

import hashlib
import json
from pathlib import Path
import shutil

import pytest

from runs import RECIPES, TINY_FIT, error_line, run_main
from scratchlm.cli import main


def fit_fails(capsys, *args: str) -> str:
    """Run ``scratchlm fit ARGS`` in this process; return its one error line."""
    return error_line(run_main(capsys, "fit", *args, check=False))


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def gpt2_fit(root: Path, *extra: str) -> list[str]:
    return ["--config", str(RECIPES / "gpt2-tiny.yaml"), "--trainer.default_root_dir", str(root), *TINY_FIT, *extra]


CORPUS_CASES = {
    # name: (file name, bytes, what the message must hold)
    "empty-after-filtering": ("blank.jsonl", b'{"text": "   "}\n\n{"text": ""}\n', ["blank.jsonl", "no documents"]),
    "binary": ("blob.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00\x00", ["blob.txt", "binary"]),
    "not-a-string": ("num.jsonl", b'{"text": 42}\n', ["num.jsonl:1", "not a string"]),
}


@pytest.mark.parametrize("case", sorted(CORPUS_CASES))
def test_bad_corpus_files(case, tmp_path, capsys):
    name, content, expected = CORPUS_CASES[case]
    (tmp_path / name).write_bytes(content)
    root = tmp_path / "run"
    error = fit_fails(capsys, *gpt2_fit(root, "--data.paths", str(tmp_path / name)))
    for text in expected:
        assert text in error, error
    assert not (root / "checkpoints").exists() and not (root / "hf").exists()
    assert (tmp_path / name).read_bytes() == content


def test_an_unknown_recipe_key_is_named(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  family: gpt2\n  famly: bert\n")
    error = fit_fails(capsys, "--config", str(typo), "--trainer.default_root_dir", str(tmp_path / "run"))
    assert "model.famly" in error and "--help" in error


def test_a_tokenizer_without_the_special_tokens_the_objective_needs(gpt2_run, tmp_path, capsys):
    _, gpt2_root, _ = gpt2_run
    error = fit_fails(
        capsys, "--config", str(RECIPES / "bert-tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.tokenizer", str(gpt2_root / "tokenizer"),
    )
    assert str(gpt2_root / "tokenizer") in error and "mask token" in error and "--family bert" in error


def test_blocks_longer_than_the_models_positions(gpt2_run, tmp_path, capsys):
    _, gpt2_root, _ = gpt2_run
    error = fit_fails(
        capsys, *gpt2_fit(tmp_path / "run", "--data.tokenizer", str(gpt2_root / "tokenizer"), "--data.block_size", "4096")
    )
    assert "data.block_size=4096" in error and "positions" in error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_from_a_checkpoint_of_another_family(gpt2_run, bert_run, tmp_path, capsys):
    _, gpt2_root, _ = gpt2_run
    _, bert_root, _ = bert_run
    checkpoint = bert_root / "checkpoints" / "last.ckpt"
    before = checkpoint.read_bytes()
    error = fit_fails(
        capsys,
        *gpt2_fit(tmp_path / "run", "--data.tokenizer", str(gpt2_root / "tokenizer"), "--ckpt_path", str(checkpoint)),
    )
    assert str(checkpoint) in error and "'bert'" in error and "model.family='gpt2'" in error
    assert checkpoint.read_bytes() == before


def test_a_run_directory_holding_a_different_run(gpt2_run, tmp_path, capsys):
    _, gpt2_root, _ = gpt2_run
    root = tmp_path / "run"
    shutil.copytree(gpt2_root, root)
    before = tree_digest(root)
    error = fit_fails(capsys, *gpt2_fit(root, "--tokenizer.vocab_size", "2000"))
    assert str(root) in error and "different run" in error and "tokenizer.vocab_size: 1000 -> 2000" in error
    assert tree_digest(root) == before
    # The same run again, without --ckpt_path, would start over on its checkpoints: refused too.
    error = fit_fails(capsys, *gpt2_fit(root))
    assert "--ckpt_path last" in error
    assert tree_digest(root) == before
    assert json.loads((root / "run.json").read_text())["model.family"] == "gpt2"


def test_a_checkpoint_whose_vocabulary_does_not_fit_this_runs_tokenizer(gpt2_run, tmp_path, capsys):
    """Same family, but this run's tokenizer (trained with another vocabulary size) gives the model
    another shape than the checkpoint's."""
    _, gpt2_root, _ = gpt2_run
    checkpoint = gpt2_root / "checkpoints" / "last.ckpt"
    error = fit_fails(capsys, *gpt2_fit(tmp_path / "run", "--tokenizer.vocab_size", "700", "--ckpt_path", str(checkpoint)))
    assert str(checkpoint) in error and "another shape" in error


def test_a_data_tokenizer_that_is_not_the_models(tmp_path):
    import lightning as L

    from scratchlm import PretrainModule, ScratchLMError, TextDataModule, train_tokenizer

    small = str(train_tokenizer(None, tmp_path / "small", vocab_size=300, family="gpt2"))
    large = str(train_tokenizer(None, tmp_path / "large", vocab_size=400, family="gpt2"))
    module = PretrainModule(tokenizer=small, family="gpt2", arch={"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64})
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ScratchLMError, match=r"data.tokenizer \(.*large, 400 tokens\) differs from model.tokenizer \(.*small, 300 tokens\); use one tokenizer for both"):
        trainer.fit(module, TextDataModule(tokenizer=large, block_size=32, batch_size=2, val_fraction=0))


@pytest.mark.parametrize("setting", [
    ("--model.optim.lr", "-1", "model.optim.lr=-1.0: must be positive"),
    ("--model.optim.warmup_steps", "-5", "model.optim.warmup_steps=-5: must be >= 0"),
    ("--model.arch", "{d_modle: 64}", "model.arch.d_modle: not a gpt2 config field"),
    ("--model.max_bad_steps", "-1", "model.max_bad_steps=-1: must be >= 0"),
    ("--trainer.max_steps", "0", "trainer.max_steps=0: the training stream repeats the corpus"),
    ("--data.val_paths", "/nonexistent/held-out.jsonl", "--data.val_paths: '/nonexistent/held-out.jsonl' matches no file"),
])
def test_a_start_that_fails_on_a_setting_leaves_the_run_directory_free(setting, tmp_path, capsys):
    """Checks that our configs make while the CLI builds them come out as one line (not the
    parser's traceback), and a start failing before its first checkpoint (here while building
    the modules or setting up the data) takes back its claim on the run directory and the
    tokenizer it trained there, so the corrected start is not refused as 'a different run'."""
    flag, value, expected = setting
    root = tmp_path / "run"
    error = fit_fails(capsys, *gpt2_fit(root, "--tokenizer.vocab_size", "300", flag, value))
    assert expected in error
    assert not (root / "run.json").exists() and not (root / "tokenizer").exists()


def test_a_run_directory_that_is_a_file_or_holds_a_torn_record(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    error = fit_fails(capsys, *gpt2_fit(tmp_path / "file"))
    assert "default_root_dir" in error and "is a file" in error
    assert (tmp_path / "file").read_text() == "mine"
    root = tmp_path / "run"
    root.mkdir()
    (root / "run.json").write_text('{"model.family": "gpt2",')
    error = fit_fails(capsys, *gpt2_fit(root))
    assert str(root / "run.json") in error and "not valid JSON" in error
    assert (root / "run.json").read_text() == '{"model.family": "gpt2",'


def test_a_missing_or_torn_checkpoint_to_resume_from(gpt2_run, tmp_path, capsys):
    """A torn last.ckpt (a copy cut short) names the intact checkpoint beside it; nothing changes."""
    _, gpt2_root, _ = gpt2_run
    error = fit_fails(capsys, *gpt2_fit(tmp_path / "fresh", "--ckpt_path", str(tmp_path / "nope.ckpt")))
    assert "nope.ckpt does not exist" in error and "--ckpt_path last" in error
    assert not (tmp_path / "fresh" / "run.json").exists() and not (tmp_path / "fresh" / "logs").exists()
    root = tmp_path / "run"
    shutil.copytree(gpt2_root, root)
    last = root / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100_000])
    before = tree_digest(root)
    error = fit_fails(capsys, *gpt2_fit(root, "--ckpt_path", "last"))
    assert str(last) in error and "torn or not a checkpoint" in error
    others = sorted(p.name for p in (root / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    assert others and all(name in error for name in others[:3])
    assert tree_digest(root) == before


@pytest.mark.parametrize("flag, value, expected", [
    ("--tokenizer.kind", "bep", "tokenizer.kind='bep': expected one of 'bpe', 'wordpiece', 'unigram', None"),
    ("--model.optim.schedule", "foo", "model.optim.schedule='foo': expected one of 'cosine', 'wsd', 'constant'"),
    ("--model.masking.whole_word", "maybe", "model.masking.whole_word='maybe': expected a bool"),
])
def test_a_value_a_setting_cannot_take_names_what_it_takes(flag, value, expected, tmp_path, capsys):
    assert expected in fit_fails(capsys, *gpt2_fit(tmp_path / "run", flag, value))


def test_a_recipe_with_a_yaml_syntax_error_is_named(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  family: gpt2\n   size: tiny\n")
    error = fit_fails(capsys, "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path / "run"))
    assert f"{recipe}, line 3" in error


def test_resuming_a_run_that_has_no_checkpoint_yet_starts_at_step_0_and_says_so(tmp_path, capsys):
    root = tmp_path / "run"
    main(["fit", *gpt2_fit(root, "--ckpt_path", "last", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                           "--tokenizer.vocab_size", "300")])
    captured = capsys.readouterr()
    assert f"no checkpoint in {root / 'checkpoints'} yet: training starts at step 0" in captured.err
    assert captured.out.strip().splitlines()[-1] == str((root / "hf").resolve())
    assert (root / "checkpoints" / "last.ckpt").is_file()


def test_a_run_stopped_midway_by_a_bad_line_still_draws_its_curves(tmp_path, capsys):
    """The runs that stop early are the ones most worth looking at: bad input met after some
    steps stops the run with its one line, and the curves of the steps it trained are drawn."""
    from pydoc_data.topics import topics

    from scratchlm.tokenizer import train_tokenizer

    paragraphs = [p for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]
    lines = [json.dumps({"text": p}) for p in paragraphs[:600]]  # well beyond a tokenizing batch (64)
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(lines) + "\n")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join([*lines, '{"text": "cut sho']) + "\n")
    tokenizer = train_tokenizer([str(clean)], tmp_path / "tok", vocab_size=300, family="gpt2")
    root = tmp_path / "run"
    error = fit_fails(capsys, *gpt2_fit(root, "--data.paths", str(corpus), "--data.tokenizer", str(tokenizer),
                                        "--data.val_fraction", "0", "--trainer.log_every_n_steps", "1"))
    assert f"{corpus}:601: malformed JSON" in error
    assert (root / "logs" / "curves.png").is_file()
