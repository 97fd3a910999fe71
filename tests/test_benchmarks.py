"""The benchmark scripts run end to end on tiny settings and print lines in their documented format.

Nothing here times anything (speed is measured in ``benchmarks/``, never asserted in a test); it
checks that the scripts still work against the current models, objectives, exports and data
pipeline, and that their output can be parsed.
"""

import gzip
import importlib.util
import json
from pathlib import Path
import re

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

NUMBER = r"[0-9.]+(?:e[+-]?[0-9]+)?"
THROUGHPUT_LINE = re.compile(
    rf"family=(\S+) dtype=(fp32|bf16) seq=(\d+) scratchlm_tok_s=({NUMBER}) hf_tok_s=({NUMBER}) "
    rf"ratio=({NUMBER}) mfu=({NUMBER})"
)
DATA_LINE = re.compile(
    rf"route=(scratchlm|prepared|hf) workers=(\d+) tok_s=({NUMBER}) peak_rss_mb=({NUMBER}) "
    rf"worker_peak_rss_mb=({NUMBER}) tree_peak_pss_mb=({NUMBER}) corpus=(\d+)x tokens=(\d+) .*"
)


def load_script(name: str):
    """A benchmark script as a module (``benchmarks/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def body_lines(output: str) -> list[str]:
    """The result lines: everything that is not a ``#`` comment."""
    return [line for line in output.splitlines() if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def throughput():
    return load_script("throughput")


def test_throughput_prints_one_line_per_case(throughput, capsys):
    throughput.main(
        ["--family", "bert,gpt2", "--dtype", "fp32", "--seq", "16", "--batch", "2", "--steps", "1",
         "--rounds", "1", "--warmup", "0", "--peak-size", "64", "--threads", "1"]
    )
    output = capsys.readouterr().out
    assert output.startswith("# cpu=")
    lines = body_lines(output)
    matches = [THROUGHPUT_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [(m[1], m[2], m[3]) for m in matches] == [("bert", "fp32", "16"), ("gpt2", "fp32", "16")]
    for m in matches:
        ours, theirs, ratio = float(m[4]), float(m[5]), float(m[6])
        assert ours > 0 and theirs > 0 and float(m[7]) > 0
        assert ratio == pytest.approx(ours / theirs, rel=0.01, abs=0.002)
    # One round: its own ratio is the case's, as median, least and greatest.
    spreads = [re.fullmatch(r"# round_ratios median=(\S+) min=(\S+) max=(\S+)", line)
               for line in output.splitlines() if line.startswith("# round_ratios")]
    assert len(spreads) == len(matches) and all(spreads)
    for spread, m in zip(spreads, matches, strict=True):
        assert [float(v) for v in spread.groups()] == [pytest.approx(float(m[6]), abs=0.002)] * 3


def test_throughput_profiles_both_sides(throughput, capsys):
    """``--profile ROWS``: after the case line, each side's top ops as ``# [side]`` lines."""
    throughput.main(
        ["--family", "gpt2", "--dtype", "fp32", "--seq", "16", "--batch", "2", "--steps", "1",
         "--rounds", "1", "--warmup", "0", "--peak-size", "64", "--threads", "1", "--profile", "3"]
    )
    output = capsys.readouterr().out
    for side in ("scratchlm", "hf"):
        rows = [line for line in output.splitlines() if line.startswith(f"# [{side}]")]
        assert any("Self CPU" in line for line in rows), output


def test_throughput_models_compute_the_same_loss(throughput, capsys):
    """The HF model of each case holds our weights: equal first losses show that the benchmark
    compares one architecture, not two."""
    throughput.main(
        ["--family", "llama", "--dtype", "fp32", "--seq", "16", "--batch", "2", "--steps", "1",
         "--rounds", "1", "--warmup", "0", "--peak-size", "64", "--threads", "1"]
    )
    check = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("# check"))
    ours = float(re.search(r"loss_scratchlm=(\S+)", check)[1])
    theirs = float(re.search(r"loss_hf=(\S+)", check)[1])
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_throughput_skips_unregistered_families(throughput, monkeypatch, capsys):
    monkeypatch.delitem(throughput.FAMILIES, "gpt2")
    throughput.main(
        ["--family", "gpt2", "--dtype", "fp32", "--seq", "8", "--batch", "1", "--steps", "1",
         "--rounds", "1", "--warmup", "0", "--peak-size", "64", "--threads", "1"]
    )
    assert body_lines(capsys.readouterr().out) == []


def test_throughput_flops_count_the_head_where_it_runs(throughput):
    """6·N per token with N the block matmuls, the MLM head on its share of positions only, and
    bert's last block, but for its keys and values, on that share too."""
    ours, _, _ = throughput.build_sides("bert", batch_size=1, seq=8, seed=0)
    model = ours.model
    D, V, L, F = 256, throughput.VOCAB, 4, 1024
    block = 4 * D * D + 2 * D * F
    tail = block - 2 * D * D  # queries, output projection, MLP of the last block
    head = V * D + D * D
    assert throughput.flops_per_token(model, seq=8, scored=0.15) == pytest.approx(
        6 * (L * block - tail) + 6 * (head + tail) * 0.15 + 12 * (L - 1 + 0.15) * 8 * D
    )
    gpt2, _, _ = throughput.build_sides("gpt2", batch_size=1, seq=8, seed=0)
    assert throughput.flops_per_token(gpt2.model, seq=8, scored=1.0) == pytest.approx(
        6 * L * block + 6 * V * D + 12 * L * 8 * D
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_throughput_packed_documents_give_hf_the_same_document_mask(throughput, family):
    """With ``--docs``, HF gets the inputs that make it compute what our document-masked model
    computes: equal logits, where the same HF model without that mask attends across documents
    (GPT-2) or finds the documents from the restarting positions itself (Llama)."""
    import torch

    ours, hf, _ = throughput.build_sides(family, batch_size=2, seq=24, seed=0, docs=3)
    objective = throughput.CausalLM(throughput.tokenizer_info(family), document_masks=True)
    batch = throughput.random_batch(objective, 2, 24, seed=0, docs=3)
    assert batch["doc_ids"][0].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    inputs = throughput.hf_inputs(family, batch, docs=3)
    with torch.no_grad():
        ours_logits = ours.model.logits(ours.model(batch["input_ids"], None, doc_ids=batch["doc_ids"]))
        hf_logits = hf.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        unmasked = hf.model(**{k: v for k, v in inputs.items() if k not in ("labels", "attention_mask")}).logits
        ours_loss, hf_loss = ours.loss().item(), hf.loss().item()
    torch.testing.assert_close(hf_logits, ours_logits, rtol=1e-4, atol=1e-4)
    if family == "gpt2":
        assert (unmasked - ours_logits).abs().max() > 1e-2
    assert hf_loss == pytest.approx(ours_loss, abs=1e-4)
    # The first token of each later document is no target: 2 blocks x (23 - 2) scored positions.
    assert (batch["labels"] != -100).sum() == 2 * 21
    assert (inputs["labels"][:, 1:] != -100).sum() == 2 * 21


def test_throughput_runs_a_named_preset(throughput, capsys):
    throughput.main(
        ["--family", "llama", "--dtype", "fp32", "--preset", "tiny", "--vocab", "500", "--seq", "16", "--batch", "2",
         "--steps", "1", "--rounds", "1", "--warmup", "0", "--peak-size", "64", "--threads", "1", "--device", "cpu"]
    )
    output = capsys.readouterr().out
    assert "each family's 'tiny' preset, vocab=500" in output
    config = throughput.build_config("llama", "tiny", vocab_size=500)
    expected = sum(p.numel() for p in throughput.build_model("llama", config).parameters())
    assert f"params={expected} " in output
    assert [THROUGHPUT_LINE.fullmatch(line)[1] for line in body_lines(output)] == ["llama"]


def test_throughput_refuses_documents_where_hf_has_no_equal(throughput, capsys):
    with pytest.raises(SystemExit):
        throughput.parse_args(["--family", "bert", "--docs", "2"])
    assert "--docs runs families gpt2, llama only; drop bert" in capsys.readouterr().err


def test_data_pipeline_prints_one_line_per_case(tmp_path, capsys):
    corpus = tmp_path / "tiny.jsonl.gz"
    words = "the quick brown fox jumps over the lazy dog while a cat sleeps in the sun".split()
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(words[i % 7 :] + words[: i % 7])}) + "\n")
    data_pipeline = load_script("data_pipeline")
    data_pipeline.main(
        ["--corpus", str(corpus), "--block-size", "16", "--batch-size", "4", "--max-tokens", "0",
         "--workers", "0", "--scales", "1", "--repeats", "1"]
    )
    output = capsys.readouterr().out
    assert output.startswith("# cpu=")
    matches = [DATA_LINE.fullmatch(line) for line in body_lines(output)]
    assert all(matches), output
    assert [(m[1], m[2], m[7]) for m in matches] == [("scratchlm", "0", "1"), ("prepared", "0", "1"), ("hf", "0", "1")]
    for m in matches:
        assert float(m[3]) > 0 and float(m[4]) > 0 and int(m[8]) > 0
    assert matches[0][8] == matches[1][8], "the prepared corpus streams the same blocks"
    assert re.search(rf"^# prepare corpus=1x tokens=\d+ seconds={NUMBER} tok_s={NUMBER} ", output, re.MULTILINE)


def test_data_pipeline_scaled_corpus_repeats_the_documents(tmp_path):
    """The k-times corpus (for the memory comparison) is the 1x documents k times over."""
    data_pipeline = load_script("data_pipeline")
    path = tmp_path / "c.jsonl.gz"
    data_pipeline.write_jsonl_gz(path, ["a b", "c"], copies=3)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert [json.loads(line)["text"] for line in f] == ["a b", "c"] * 3


SOAK_LINE = re.compile(
    rf"soak: minutes=\S+ steps=(\d+) tok_s_start=({NUMBER}) tok_s_end=({NUMBER}) speed_ratio=({NUMBER}) "
    rf"rss_start_mb=({NUMBER}) rss_end_mb=({NUMBER}) rss_growth_mb=([+-]{NUMBER}) .*"
)


def test_soak_samples_speed_and_memory_and_summarises(capsys):
    soak = load_script("soak")
    soak.main(["--minutes", "0.08", "--interval", "0.5", "--workers", "0", "--vocab-size", "300",
               "--batch-size", "2", "--block-size", "32"])
    lines = body_lines(capsys.readouterr().out)
    samples = [line for line in lines if line.startswith("t=")]
    assert len(samples) >= 3, lines
    summary = SOAK_LINE.fullmatch(lines[-1])
    assert summary, lines[-1]
    assert int(summary[1]) > 0 and float(summary[2]) > 0 and float(summary[5]) > 0


def test_fit_speed_summarises_the_logged_throughput(tmp_path, capsys):
    logs = tmp_path / "logs" / "version_0"
    logs.mkdir(parents=True)
    rows = ["epoch,step,train/loss,train/tok_s,train/tflops", "0,1,9.0,100,0.1", "0,3,8.0,,"]
    rows += [f"0,{step},7.0,{1000 + step},{step / 10}" for step in (10, 12, 14)]
    (logs / "metrics.csv").write_text("\n".join(rows) + "\n")
    fit_speed = load_script("fit_speed")
    fit_speed.main([str(tmp_path), "--skip", "5"])
    assert capsys.readouterr().out.strip() == "rows=3 steps=10..14 tok_s=1012 tflops=1.2"
    with pytest.raises(SystemExit, match="no train/tok_s logged after step 50"):
        fit_speed.main([str(tmp_path), "--skip", "50"])


def test_head_loss_times_both_routes(capsys):
    head_loss = load_script("head_loss")
    head_loss.main(["--vocab", "300", "--d-model", "16", "--tokens", "64", "--rows", "default,8", "--repeats", "1"])
    lines = body_lines(capsys.readouterr().out)
    pattern = re.compile(rf"vocab=300 d_model=16 tokens=64 dtype=(fp32|bf16) route=(fused|plain) rows=(\S+) ms=({NUMBER})")
    matches = [pattern.fullmatch(line) for line in lines]
    assert all(matches), lines
    budget = f"default({(4 << 20) // (4 * 300)})"  # a small vocabulary: the byte budget decides
    assert [(m[1], m[2], m[3]) for m in matches] == [
        ("fp32", "fused", budget), ("fp32", "fused", "8"), ("fp32", "plain", "-"),
        ("bf16", "fused", budget), ("bf16", "fused", "8"), ("bf16", "plain", "-"),
    ]
