"""The comparison's outputs: ``metrics.json`` (every number, per seed), ``report.md`` (the tables,
the winner of each metric and by how much against the spread over seeds, the recipe, the
versions) and PNG plots (held-out loss against tokens and against FLOPs, probe accuracy, bits per
byte).

Plots are drawn on ``matplotlib.figure.Figure`` objects directly, without ``pyplot``: no display
and no global backend switch is needed, so this works on a headless machine and leaves a user's
interactive session alone.
"""

from dataclasses import dataclass
import json
import math
from pathlib import Path
import platform
import statistics
from typing import Any

from matplotlib.figure import Figure

import scratchlm


@dataclass(frozen=True)
class Metric:
    """How one metric reads in the report."""

    label: str
    higher_is_better: bool
    shared: bool
    """On one scale for every arm, so a winner can be named (False: objective-specific)."""
    digits: int = 3


METRICS: dict[str, Metric] = {
    "bits_per_byte": Metric("held-out bits per byte", False, True),
    "nll_per_token": Metric("held-out nats per token", False, True),
    "finetune_accuracy": Metric("probe, fine-tuned: accuracy", True, True),
    "finetune_macro_f1": Metric("probe, fine-tuned: macro-F1", True, True),
    "linear_accuracy": Metric("probe, frozen linear: accuracy", True, True),
    "linear_macro_f1": Metric("probe, frozen linear: macro-F1", True, True),
    "val_loss": Metric("held-out loss of its own objective (nats)", False, False),
    "perplexity": Metric("perplexity (causal LM)", False, False, 2),
    "pseudo_perplexity": Metric("pseudo-perplexity (MLM, span corruption)", False, False, 2),
    "mlm_accuracy": Metric("MLM accuracy at 15% masking", True, False),
    "mlm_loss": Metric("MLM loss at 15% masking (nats)", False, False),
    "span_accuracy": Metric("span-corruption accuracy of target tokens, training noise", True, False),
    "span_loss": Metric("span-corruption loss of target tokens, training noise (nats)", False, False),
}
"""Every metric an arm may have, in report order."""

RUN_FIELDS = ("steps", "tokens", "flops", "train_seconds", "tokens_per_second")
"""Per-seed training numbers, summarised like the metrics."""


# --- numbers -----------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (None for one value) and count."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def summarise_arm(arm: dict[str, Any]) -> dict[str, dict]:
    """Mean ± std over seeds of every training number and metric of one arm."""
    runs = arm["runs"]
    names = [n for n in (*RUN_FIELDS, *METRICS) if all(n in r or n in r["metrics"] for r in runs)]
    return {n: summary([float(r[n] if n in r else r["metrics"][n]) for r in runs]) for n in names}


def winner(name: str, summaries: dict[str, dict]) -> dict[str, Any] | None:
    """The best arm on a shared metric, its margin over the runner-up, and that margin against
    the spread: the standard deviation of a difference of two single runs,
    sqrt(std_best² + std_runner_up²), which needs two or more seeds."""
    metric = METRICS[name]
    scored = {arm: s[name] for arm, s in summaries.items() if name in s}
    if not metric.shared or len(scored) < 2:
        return None
    ranked = sorted(scored, key=lambda a: scored[a]["mean"], reverse=metric.higher_is_better)
    best, second = scored[ranked[0]], scored[ranked[1]]
    margin = abs(best["mean"] - second["mean"])
    if margin == 0:
        return {"metric": name, "best": "tie", "runner_up": "tie", "margin": 0.0, "spread": None,
                "margin_over_spread": None, "verdict": "tie"}
    spread = math.hypot(best["std"], second["std"]) if best["std"] is not None and second["std"] is not None else None
    ratio = margin / spread if spread else None
    return {
        "metric": name,
        "best": ranked[0],
        "runner_up": ranked[1],
        "margin": margin,
        "spread": spread,
        "margin_over_spread": ratio,
        "verdict": verdict(ratio, spread),
    }


def verdict(ratio: float | None, spread: float | None) -> str:
    if spread is None:
        return "one seed: spread unknown (run --seeds 3 or more)"
    if spread == 0:
        return "clear (no spread over seeds)"
    if ratio >= 2:
        return "clear"
    return "slight" if ratio >= 1 else "within noise"


def build_metrics(results: dict[str, dict], context: dict[str, Any]) -> dict[str, Any]:
    """The whole ``metrics.json``: the context, every arm with every run, summaries and winners."""
    summaries = {name: summarise_arm(arm) for name, arm in results.items() if arm["runs"]}
    for name, arm in results.items():
        arm["summary"] = summaries.get(name, {})
    winners = [w for name in METRICS if (w := winner(name, summaries)) is not None]
    return {**context, "arms": results, "winners": winners}


def versions() -> dict[str, str]:
    import lightning
    import tokenizers
    import torch
    import transformers

    return {
        "scratchlm": scratchlm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }


# --- writing -----------------------------------------------------------------------------------


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_report(out: Path, metrics: dict[str, Any], recipe: str) -> Path:
    """``report.md`` and the plots into ``out``; returns the report's path."""
    plots = write_plots(out, metrics)
    text = "\n".join([*header(metrics), *runs_table(metrics), *metrics_table(metrics), *winners_section(metrics),
                      *notes(metrics), *plot_links(plots), *recipe_section(recipe, metrics)])
    path = out / "report.md"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def mean_std(s: dict | None, digits: int) -> str:
    if not s:
        return "–"
    mean = f"{s['mean']:.{digits}f}"
    return mean if s["std"] is None else f"{mean} ± {s['std']:.{digits}f}"


def big(x: float) -> str:
    """A count in engineering form: 1.23M, 4.5e15."""
    for size, unit in ((1e12, None), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= size:
            return f"{x:.3g}" if unit is None else f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def header(m: dict) -> list[str]:
    arms = ", ".join(f"`{name}` ({arm['family']}, {arm['objective']})" for name, arm in m["arms"].items())
    return [
        f"# Objective comparison: {' vs '.join(m['arms'])}",
        "",
        f"Arms: {arms}. Corpus: {m['corpus']}. Tokenizer: {m['tokenizer']['kind']}, "
        f"{m['tokenizer']['vocab_size']} tokens, shared by every arm. Budget per arm: {m['budget']}. "
        f"Seeds: {m['seeds']} (each seed trains every arm on the same token stream; numbers are mean ± std over seeds).",
        "",
    ]


def runs_table(m: dict) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| arm | family | objective | layers × width (FFN) | params | non-embedding | FLOPs/token | steps | tokens "
        "| FLOPs | wall time (s) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in m["arms"].items():
        s = arm["summary"]
        lines.append(
            f"| {name} | {arm['family']} | {arm['objective']} | {shape(arm['shape'])} | {big(arm['params'])} "
            f"| {big(arm['params_non_embedding'])} "
            f"| {big(arm['flops_per_token'])} | {s['steps']['mean']:.0f} | {big(s['tokens']['mean'])} | {big(s['flops']['mean'])} "
            f"| {mean_std(s['train_seconds'], 1)} | {mean_std(s['tokens_per_second'], 0)} |"
        )
    return lines + [""]


def shape(s: dict) -> str:
    """"4 × 128 (256)", or "2+2 × 128 (320)" for an encoder-decoder's encoder and decoder layers."""
    layers = f"{s['layers']}+{s['decoder_layers']}" if "decoder_layers" in s else f"{s['layers']}"
    return f"{layers} × {s['d_model']} ({s['d_ff']})"


def metrics_table(m: dict) -> list[str]:
    names = list(m["arms"])
    wins = {w["metric"]: w for w in m["winners"]}
    lines = [
        "## Held-out text and downstream probe",
        "",
        f"| metric | better | {' | '.join(names)} | winner |",
        f"|---|---|{'---|' * len(names)}---|",
    ]
    for key, metric in METRICS.items():
        cells = [mean_std(m["arms"][n]["summary"].get(key), metric.digits) for n in names]
        if all(c == "–" for c in cells):
            continue
        w = wins.get(key)
        won = "(one scale per objective)" if not w else "tie" if w["best"] == "tie" else f"{w['best']} by {w['margin']:.{metric.digits}f}"
        lines.append(f"| {metric.label} | {'higher' if metric.higher_is_better else 'lower'} | {' | '.join(cells)} | {won} |")
    probe = m["probe"]
    lines += ["", f"Majority-class rate of the probe's test split: **{probe['majority_rate']:.3f}** "
              f"(always answering {probe['majority_label']!r}); {len(probe['labels'])} labels, "
              f"{probe['train']} training and {probe['test']} test examples from {probe['source']}.", ""]
    return lines


def winners_section(m: dict) -> list[str]:
    lines = ["## Who won", ""]
    for w in m["winners"]:
        metric = METRICS[w["metric"]]
        if w["best"] == "tie":
            lines.append(f"- {metric.label}: a tie.")
            continue
        against = (f", {w['margin_over_spread']:.1f}× the spread ({w['spread']:.{metric.digits}f})"
                   if w["margin_over_spread"] is not None else "")
        lines.append(f"- {metric.label}: **{w['best']}** over {w['runner_up']} by {w['margin']:.{metric.digits}f}{against}: {w['verdict']}.")
    return lines + [""]


def notes(m: dict) -> list[str]:
    e = m["eval"]
    spans = [arm for arm in m["arms"].values() if arm["objective"] == "span"]
    lines = [
        "## How it was measured",
        "",
        f"- Held-out text: the first {e['documents']} held-out documents, each cut to about {e['doc_tokens']} tokens: "
        f"{e['tokens']} scored tokens, {e['bytes']} UTF-8 bytes, the same for every arm. Windows of {e['window']} tokens "
        "(the training length), overlapping by one token; every non-special token is scored once.",
        "- Bits per byte = summed NLL / (ln 2 × bytes). Causal LM: next-token likelihood. MLM: pseudo-log-likelihood "
        "(each token masked in turn, predicted from both sides of its window)."
        + (" Span corruption: the same pseudo-log-likelihood, each token in turn a one-token span (replaced by "
           "`<extra_id_0>` in the encoder's input, predicted by the decoder after that sentinel)." if spans else "")
        + " A pseudo-likelihood is not a normalised probability of the text, so "
        + ("these arms' figures are no code lengths and tend to flatter MLM and span corruption" if spans
           else "MLM's figure is no code length and tends to flatter MLM")
        + ": read bits per byte as a shared scale, not a tie-breaker.",
        "- The held-out loss of each arm's own objective (masked tokens at the training rate, next tokens"
        + (", or span-corruption targets" if spans else "") + ") is not one scale across objectives: no winner is named on it.",
        "- FLOPs per token = 6 × (weights each token uses; the head only on the positions it runs on: every position "
        "for causal LM, the masked ones for MLM, where the last encoder block too runs at the masked positions "
        "alone but for its keys and values) + 12 × layers × block × width for attention (the last MLM layer's "
        "queries on the masked share).",
    ]
    if spans:
        f = spans[0]["flop_count"]
        lines += [
            f"- Tokens are the shared stream's block tokens, for every arm. A span arm makes each block of "
            f"{f['block_size']} tokens into {f['encoder_length']} encoder input and {f['decoder_length']} target tokens "
            "(the hidden spans, each behind its sentinel, and end-of-text); its tokens are the block tokens they were made "
            "from, and its FLOPs per token = (6 × (encoder weights, cross-attention keys and values) × encoder length + "
            "6 × (decoder weights and head) × target length + 12 × width × (encoder layers × encoder length² + decoder "
            "layers × (target length² + target length × encoder length))) / block size.",
            "- Layers × width: an encoder-decoder's layers are split between its encoder and decoder (encoder+decoder).",
        ]
    lines += [
        "- Probe: the exported Hugging Face folder, fine-tuned with AutoModelForSequenceClassification, and a logistic "
        "regression on frozen mean-pooled last hidden states"
        + (" (an encoder-decoder's encoder states; T5's classifier reads the decoder's state at the input's "
           "end-of-text)" if spans else "") + ".",
        "",
    ]
    return lines


def plot_links(plots: list[Path]) -> list[str]:
    return ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]


def recipe_section(recipe: str, m: dict) -> list[str]:
    v = ", ".join(f"{k} {value}" for k, value in m["versions"].items())
    return ["## Recipe", "", "```yaml", recipe.rstrip(), "```", "", f"Versions: {v}."]


# --- plots -------------------------------------------------------------------------------------


def write_plots(out: Path, m: dict) -> list[Path]:
    paths = [
        curve_plot(out / "loss_vs_tokens.png", m, "tokens", "training tokens"),
        curve_plot(out / "loss_vs_flops.png", m, "flops", "training FLOPs"),
        bar_plot(out / "probe_accuracy.png", m, ["finetune_accuracy", "linear_accuracy"], "probe test accuracy",
                 reference=("majority class", m["probe"]["majority_rate"])),
        bar_plot(out / "bits_per_byte.png", m, ["bits_per_byte"], "held-out bits per byte (lower is better)"),
    ]
    return paths


def curve_plot(path: Path, m: dict, x_key: str, x_label: str) -> Path:
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    colors = [f"C{i}" for i in range(len(m["arms"]))]
    for color, (name, arm) in zip(colors, m["arms"].items()):
        for k, run in enumerate(arm["runs"]):
            xs = [p[x_key] for p in run["curve"]]
            ys = [p["val_loss"] for p in run["curve"]]
            axes.plot(xs, ys, marker="o", markersize=3, color=color, alpha=0.9 if k == 0 else 0.5,
                      label=f"{name} ({arm['objective']})" if k == 0 else None)
    axes.set_xlabel(x_label)
    axes.set_ylabel("held-out loss of the arm's objective (nats)")
    axes.set_title(f"held-out loss vs {x_label}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=110)
    return path


def bar_plot(path: Path, m: dict, keys: list[str], title: str, reference: tuple[str, float] | None = None) -> Path:
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    names = list(m["arms"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        s = m["arms"][name]["summary"]
        means = [s[k]["mean"] if k in s else float("nan") for k in keys]
        errors = [s[k]["std"] or 0.0 if k in s else 0.0 for k in keys]
        positions = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
        axes.bar(positions, means, width, yerr=errors, capsize=4, label=name, color=f"C{i}")
    if reference:
        axes.axhline(reference[1], color="gray", linestyle="--", label=reference[0])
    axes.set_xticks(range(len(keys)), [METRICS[k].label for k in keys])
    axes.set_title(title + f" (error bars: std over {m['seeds']} seed{'s' if m['seeds'] > 1 else ''})")
    axes.legend()
    figure.savefig(path, dpi=110)
    return path
