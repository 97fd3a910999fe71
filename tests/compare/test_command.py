"""``scratchlm compare`` end to end on the tiny recipe (built-in corpus, a very small budget), the
shipped compare recipes, and bad input."""

import json
import math
from pathlib import Path

import pytest

from runs import RECIPES
from scratchlm.cli import main
from scratchlm.compare.command import parse
from scratchlm.errors import ScratchLMError

COMPARE_RECIPES = sorted((RECIPES / "compare").glob("*.yaml"))

# The tiny recipe made tinier: a 1-layer model, a few dozen steps, a small probe; two seeds so the
# report has spreads.
TINIER = [
    "--budget.tokens", "6000",
    "--seeds", "2",
    "--model.arch", "{n_layers: 1, d_model: 32, n_heads: 2, d_ff: 64, local_window: 16}",
    "--model.optim.warmup_steps", "5",
    "--tokenizer.vocab_size", "400",
    "--data.block_size", "32",
    "--data.batch_size", "8",
    "--train.curve_points", "3",
    "--train.val_batches", "2",
    "--eval.documents", "3",
    "--eval.doc_tokens", "40",
    "--probe.max_train", "96",
    "--probe.max_test", "48",
    "--probe.max_length", "32",
    "--probe.epochs", "1",
]


# The three-arm recipe's own arms made tinier in the same way, one seed (the span arm keeps its
# preset's 2 + 2 layers: a shared n_layers is its encoder's depth).
TINIER_THREE_ARMS = [
    "--budget.tokens", "6000",
    "--model.arch", "{n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64}",
    *TINIER[TINIER.index("--model.optim.warmup_steps") :],
]
SPAN_RECIPE = str(RECIPES / "compare" / "mlm-clm-span-tiny.yaml")


def compare(*args: str, recipe: str = "mlm-vs-clm-tiny.yaml") -> None:
    main(["compare", "--config", str(RECIPES / "compare" / recipe), *args])


@pytest.mark.parametrize("recipe", [p.name for p in COMPARE_RECIPES])
def test_every_compare_recipe_parses(recipe, tmp_path):
    text = (RECIPES / "compare" / recipe).read_text()
    assert text.startswith("#"), "a recipe opens with a comment: what it compares, what it should show"
    config, dumped = parse(["--config", str(RECIPES / "compare" / recipe), "--out", str(tmp_path)])
    config.check()  # a budget, two arms or more, sane settings
    assert len(config.arms) >= 2 and "budget:" in dumped


def test_the_tiny_comparison_writes_its_report_metrics_and_plots(tmp_path, capsys):
    out = tmp_path / "compare"
    compare("--out", str(out), *TINIER)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str((out / "report.md").resolve())

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["arms"]) == ["mlm", "clm"]
    for name, arm in metrics["arms"].items():
        assert len(arm["runs"]) == 2 and [r["seed"] for r in arm["runs"]] == [0, 1]
        for run in arm["runs"]:
            assert run["tokens"] == 24 * 8 * 32  # ceil(6000 / 256) steps of 8 x 32 tokens, for every arm
            assert len(run["curve"]) >= 2 and run["curve"][-1]["tokens"] == run["tokens"]
            assert math.isfinite(run["metrics"]["bits_per_byte"])
            assert run["metrics"]["eval_bytes"] == metrics["eval"]["bytes"]  # the same bytes for every arm
            assert (Path(run["hf"]) / "model.safetensors").is_file()
        assert arm["summary"]["bits_per_byte"]["std"] is not None
    assert "mlm_accuracy" in metrics["arms"]["mlm"]["summary"] and "perplexity" in metrics["arms"]["clm"]["summary"]
    assert {w["metric"] for w in metrics["winners"]} >= {"bits_per_byte", "finetune_accuracy", "linear_accuracy"}

    report = (out / "report.md").read_text()
    for name in ("loss_vs_tokens.png", "loss_vs_flops.png", "probe_accuracy.png", "bits_per_byte.png"):
        assert (out / name).stat().st_size > 1000 and f"({name})" in report
    bpb = metrics["arms"]["clm"]["summary"]["bits_per_byte"]
    assert f"{bpb['mean']:.3f} ± {bpb['std']:.3f}" in report
    assert f"{metrics['probe']['majority_rate']:.3f}" in report
    assert "| mlm | modernbert | mlm |" in report and "| clm | modernbert-causal | clm |" in report
    assert "tokens: 6000" in report  # the recipe as run


def test_the_tiny_three_arm_comparison_reports_the_span_arm_like_the_others(tmp_path, capsys):
    out = tmp_path / "compare"
    compare("--out", str(out), *TINIER_THREE_ARMS, recipe="mlm-clm-span-tiny.yaml")
    assert capsys.readouterr().out.strip().splitlines()[-1] == str((out / "report.md").resolve())

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["arms"]) == ["mlm", "clm", "span"]
    span = metrics["arms"]["span"]
    assert (span["family"], span["objective"]) == ("t5", "span")
    assert span["shape"] == {"layers": 2, "decoder_layers": 2, "d_model": 32, "d_ff": 64}
    for arm in metrics["arms"].values():
        run = arm["runs"][0]
        assert run["tokens"] == 24 * 8 * 32  # the same block tokens for every arm, the span arm's included
        assert run["curve"][-1]["tokens"] == run["tokens"]
        assert run["metrics"]["eval_bytes"] == metrics["eval"]["bytes"]  # the same bytes for every arm
        assert math.isfinite(run["metrics"]["bits_per_byte"]) and math.isfinite(run["metrics"]["finetune_accuracy"])
    span_metrics = span["runs"][0]["metrics"]
    assert all(math.isfinite(span_metrics[k]) for k in ("span_loss", "span_accuracy", "pseudo_perplexity", "linear_accuracy"))
    assert span["flops_per_token"] == pytest.approx(span["runs"][0]["flops"] / span["runs"][0]["tokens"])
    assert metrics["tokenizer"]["sentinels_used"] == 2  # round(0.15 x 32) = 5 hidden tokens in round(5 / 3) spans
    hf = Path(span["runs"][0]["hf"])
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["T5ForConditionalGeneration"]

    report = (out / "report.md").read_text()
    assert "| span | t5 | span | 2+2 × 32 (64) |" in report and "flatter MLM and span corruption" in report
    for name in ("loss_vs_tokens.png", "loss_vs_flops.png", "probe_accuracy.png", "bits_per_byte.png"):
        assert (out / name).stat().st_size > 1000 and f"({name})" in report
    bpb = span["summary"]["bits_per_byte"]["mean"]
    assert f"{bpb:.3f}" in report


def test_a_given_tokenizer_without_sentinels_is_one_clear_error_before_training(bert_style_tokenizer, tmp_path, capsys):
    message = error_of(capsys, "--config", SPAN_RECIPE, "--out", str(tmp_path / "out"), "--data.tokenizer", bert_style_tokenizer)
    assert bert_style_tokenizer in message and "0 sentinel tokens" in message and "--sentinels 6" in message
    assert not (tmp_path / "out" / "arms").exists()


def error_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *args])
    assert exit_info.value.code == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("scratchlm: error:")]
    assert len(lines) == 1
    return lines[0]


def test_an_unknown_flag_or_recipe_key_is_one_line_not_the_usage(tmp_path, capsys):
    tiny = str(RECIPES / "compare" / "mlm-vs-clm-tiny.yaml")
    message = error_of(capsys, "--config", tiny, "--out", str(tmp_path / "a"), "--model.d_modle", "64")
    assert "--model.d_modle" in message and "scratchlm compare --help" in message
    typo = tmp_path / "typo.yaml"
    typo.write_text((RECIPES / "compare" / "mlm-vs-clm-tiny.yaml").read_text().replace("block_size:", "blok_size:"))
    message = error_of(capsys, "--config", str(typo), "--out", str(tmp_path / "b"))
    assert "blok_size" in message


def test_no_budget_is_one_clear_error(tmp_path, capsys):
    message = error_of(capsys, "--out", str(tmp_path / "out"))
    assert "no budget" in message and "--budget.tokens" in message


def test_a_missing_probe_file_or_label_field_is_one_clear_error(tmp_path, capsys):
    tiny = str(RECIPES / "compare" / "mlm-vs-clm-tiny.yaml")
    message = error_of(capsys, "--config", tiny, "--out", str(tmp_path / "a"), "--probe.data", str(tmp_path / "none.jsonl"))
    assert "none.jsonl does not exist" in message
    labeled = tmp_path / "topics.jsonl"
    labeled.write_text(json.dumps({"text": "a document", "topic": "x"}) + "\n")
    message = error_of(capsys, "--config", tiny, "--out", str(tmp_path / "b"), "--probe.data", str(labeled))
    assert "topics.jsonl:1" in message and "'label'" in message and "--probe.label_field" in message


def test_a_previous_comparison_needs_overwrite_and_other_files_are_named(tmp_path, capsys):
    before = a_previous_comparison(tmp_path / "old")
    message = error_of(capsys, "--config", str(RECIPES / "compare" / "mlm-vs-clm-tiny.yaml"), "--out", str(tmp_path / "old"))
    assert str(tmp_path / "old") in message and "pass --overwrite true" in message
    assert snapshot(tmp_path / "old") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "old.txt").write_text("keep me")
    message = error_of(capsys, "--config", str(RECIPES / "compare" / "mlm-vs-clm-tiny.yaml"), "--out", str(tmp_path / "mine"))
    assert "(old.txt)" in message and "--overwrite" not in message  # it would not help


def a_previous_comparison(out: Path) -> dict[str, bytes]:
    """OUT as a finished comparison leaves it (its files' contents stand in), and a snapshot."""
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("the tokenizer the old arms used")
    (out / "report.md").write_text("the old report")
    (out / "metrics.json").write_text("{}")
    return snapshot(out)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_previous_comparison_until_every_arm_is_known_to_fit(tmp_path, capsys):
    """A setting that only fails once the tokenizer is trained and the arms are built (a block
    longer than the models' positions) stops before OUT changes: the old report and the tokenizer
    its arms used stay together, and no staged tokenizer is left beside OUT."""
    out = tmp_path / "out"
    before = a_previous_comparison(out)
    message = error_of(capsys, "--config", str(RECIPES / "compare" / "mlm-vs-clm-tiny.yaml"), "--out", str(out),
                       "--overwrite", "true", *TINIER, "--data.block_size", "100000")
    assert "data.block_size=100000" in message and "max_positions" in message
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    compare("--out", str(out), "--overwrite", "true", *TINIER, "--seeds", "1")  # the same, now valid
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokenizer"]["path"] == str(out / "tokenizer") and (out / "report.md").read_text() != "the old report"
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() != before["tokenizer/tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    # Once more on the tokenizer that comparison trained: it is the new run's input, so it stays.
    tokenizer = (out / "tokenizer" / "tokenizer.json").read_bytes()
    compare("--out", str(out), "--overwrite", "true", *TINIER, "--seeds", "1", "--data.tokenizer", str(out / "tokenizer"))
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer and (out / "report.md").is_file()


def test_overwrite_never_replaces_files_a_comparison_did_not_write(tmp_path, capsys):
    out = tmp_path / "out"
    a_previous_comparison(out)
    (out / "thesis.txt").write_text("keep me")
    before = snapshot(out)
    message = error_of(capsys, "--config", str(RECIPES / "compare" / "mlm-vs-clm-tiny.yaml"), "--out", str(out),
                       "--overwrite", "true", *TINIER)
    assert "thesis.txt" in message and "choose another folder" in message
    assert snapshot(out) == before


def test_a_budget_on_the_command_line_replaces_the_recipes(tmp_path):
    small = str(RECIPES / "compare" / "mlm-vs-clm-small.yaml")  # its budget is in FLOPs
    config, recipe = parse(["--config", small, "--out", str(tmp_path), "--budget.tokens", "1000"])
    assert (config.budget.tokens, config.budget.flops, config.budget.minutes) == (1000, None, None)
    assert "tokens: 1000" in recipe and "flops: null" in recipe
    both, _ = parse(["--config", small, "--out", str(tmp_path), "--budget.tokens", "1000", "--budget.minutes=2"])
    with pytest.raises(ScratchLMError, match="several budgets"):
        both.check()
