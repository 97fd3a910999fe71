"""The report: summaries over seeds, winners judged against the spread, the files written."""

import json

import pytest

from scratchlm.compare.report import build_metrics, summary, winner, write_metrics, write_report


def run(seed: int, bpb: float, accuracy: float, **extra) -> dict:
    curve = [{"step": s, "tokens": 100 * s, "flops": 1e6 * s, "val_loss": 6.0 - s / 10} for s in (1, 2, 3)]
    metrics = {"bits_per_byte": bpb, "nll_per_token": bpb * 2, "finetune_accuracy": accuracy,
               "finetune_macro_f1": accuracy - 0.1, "linear_accuracy": accuracy - 0.05,
               "linear_macro_f1": accuracy - 0.15, "val_loss": 5.0, **extra}
    return {"seed": seed, "steps": 3, "tokens": 300, "flops": 3e6, "train_seconds": 2.0 + seed,
            "tokens_per_second": 300 / (2.0 + seed), "curve": curve, "metrics": metrics}


def arm(family: str, objective: str, runs: list[dict], **extra) -> dict:
    return {"family": family, "objective": objective, "params": 1_200_000, "params_non_embedding": 700_000,
            "flops_per_token": 1e4, "shape": {"layers": 4, "d_model": 128, "d_ff": 256}, "runs": runs, **extra}


CONTEXT = {
    "corpus": "test corpus", "tokenizer": {"kind": "bpe", "vocab_size": 600}, "budget": "300 tokens", "seeds": 3,
    "eval": {"documents": 2, "doc_tokens": 40, "tokens": 80, "bytes": 300, "window": 16},
    "probe": {"source": "test", "labels": ["a", "b"], "train": 10, "test": 5, "majority_label": "a", "majority_rate": 0.6},
    "versions": {"torch": "x"},
}


def results() -> dict:
    return {
        "mlm": arm("modernbert", "mlm", [run(s, 2.0 + 0.01 * s, 0.80 + 0.01 * s, mlm_accuracy=0.3) for s in range(3)]),
        "clm": arm("modernbert-causal", "clm", [run(s, 2.5 + 0.01 * s, 0.79 + 0.01 * s, perplexity=90.0) for s in range(3)]),
    }


def test_summary_is_mean_and_sample_std():
    s = summary([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summary([4.0])["std"] is None


def test_winners_are_named_on_shared_metrics_and_judged_against_the_spread():
    metrics = build_metrics(results(), CONTEXT)
    wins = {w["metric"]: w for w in metrics["winners"]}
    assert wins["bits_per_byte"]["best"] == "mlm"  # lower is better
    assert wins["bits_per_byte"]["margin"] == pytest.approx(0.5)
    assert wins["bits_per_byte"]["verdict"] == "clear"  # 0.5 against a spread of ~0.014
    assert wins["finetune_accuracy"]["best"] == "mlm" and wins["finetune_accuracy"]["verdict"] == "within noise"
    # Objective-specific numbers are on different scales: no winner.
    assert not {"val_loss", "perplexity", "mlm_accuracy"} & set(wins)


def test_one_seed_leaves_the_spread_unknown_and_equal_means_tie():
    one = {name: {**entry, "runs": entry["runs"][:1]} for name, entry in results().items()}
    summaries = build_metrics(one, CONTEXT)["arms"]
    w = winner("bits_per_byte", {name: entry["summary"] for name, entry in summaries.items()})
    assert w["spread"] is None and "spread unknown" in w["verdict"]
    tied = winner("val_loss", {"a": {"val_loss": summary([1.0])}, "b": {"val_loss": summary([1.0])}})
    assert tied is None  # not shared
    tied = winner("bits_per_byte", {"a": {"bits_per_byte": summary([1.0])}, "b": {"bits_per_byte": summary([1.0])}})
    assert tied["best"] == "tie"


def test_the_report_holds_the_table_the_winners_and_the_plots(tmp_path):
    metrics = build_metrics(results(), CONTEXT)
    write_metrics(tmp_path / "metrics.json", metrics)
    report = write_report(tmp_path, metrics, "budget:\n  tokens: 300\n").read_text()
    for name in ("loss_vs_tokens.png", "loss_vs_flops.png", "probe_accuracy.png", "bits_per_byte.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in report
    assert "| mlm | modernbert | mlm | 4 × 128 (256) |" in report
    assert "span" not in report  # nothing about span arms where there is none
    assert "2.010 ± 0.010" in report  # mlm bits per byte, mean ± std over the three seeds
    assert "**mlm** over clm by 0.500" in report
    assert "0.600" in report  # the majority-class rate
    assert "tokens: 300" in report  # the recipe
    assert json.loads((tmp_path / "metrics.json").read_text())["arms"]["clm"]["runs"][2]["metrics"]["perplexity"] == 90.0


def test_a_span_arm_is_reported_like_the_others_with_its_own_caveats(tmp_path):
    entries = results()
    entries["span"] = arm(
        "t5", "span", [run(s, 2.2 + 0.01 * s, 0.7, span_accuracy=0.4, span_loss=3.5) for s in range(3)],
        shape={"layers": 2, "decoder_layers": 2, "d_model": 128, "d_ff": 320},
        flop_count={"block_size": 128, "encoder_length": 116, "decoder_length": 26},
    )
    metrics = build_metrics(entries, CONTEXT)
    report = write_report(tmp_path, metrics, "").read_text()
    assert "| span | t5 | span | 2+2 × 128 (320) |" in report
    assert "2.210 ± 0.010" in report and "0.400 ± 0.000" in report  # bits per byte, span accuracy
    assert "`<extra_id_0>`" in report and "flatter MLM and span corruption" in report
    assert "128 tokens into 116 encoder input and 26 target tokens" in report
    assert "span_accuracy" not in {w["metric"] for w in metrics["winners"]}  # objective-specific: no winner
