"""``scratchlm compare``: the command line, and the comparison it runs, as a table of contents.

    scratchlm compare --config recipes/compare/mlm-vs-clm-tiny.yaml --out runs/compare [--seeds 3]
        [--budget.tokens N | --budget.flops X | --budget.minutes M] [--data.paths ...]
        [--probe.data FILE --probe.text_field text --probe.label_field label]

Flags come from the dataclasses of ``compare.config`` (jsonargparse, as ``scratchlm fit``'s
LightningCLI); the recipe's keys are the same.
"""

from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
import itertools
import shutil
import sys
from typing import Any
import uuid

from jsonargparse import ActionConfigFile, ArgumentParser
import torch

from scratchlm.compare.arms import (
    ArmRun,
    ArmSize,
    arm_size,
    block_tokens_per_step,
    seconds_per_step,
    steps_for_budget,
    train_arm,
)
from scratchlm.compare.config import Arm, CompareConfig, default_arms
from scratchlm.compare.evaluate import HeldOut, evaluate_arm, load_held_out
from scratchlm.compare.probe import probe_device, run_probes
from scratchlm.compare.probe_data import ProbeSet, load_probe_set
from scratchlm.compare.report import build_metrics, versions, write_metrics, write_report
from scratchlm.data import describe_sources, resolve_sources
from scratchlm.errors import ScratchLMError
from scratchlm.folders import check_destination
from scratchlm.objectives.span import noise_counts
from scratchlm.tokenizer import SENTINEL, TokenizerInfo, train_tokenizer
from scratchlm.training import TrainedModel

TOKENIZER_STYLE = "modernbert"
"""Whose special tokens the shared tokenizer gets: BERT-style ([CLS] [SEP] [MASK] [PAD]), which
every arm can use; MLM needs the mask token, and the causal arms read [SEP] as end of text. With
a span arm it also gets sentinels, and [SEP] becomes its eos (see ``tokenizer.train_tokenizer``)."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="scratchlm compare",
        exit_on_error=False,  # a bad flag or recipe key: one line from cli.main, not the whole usage
        description="Pre-train several arms (MLM, causal LM, span corruption) on the same tokens to the same budget; report.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a recipe, e.g. recipes/compare/mlm-vs-clm-tiny.yaml")
    parser.add_class_arguments(CompareConfig, None)
    # Defaults as plain data, so that the recipe written into the report spells them out.
    parser.set_defaults(arms=[asdict(arm) for arm in default_arms()])
    return parser


def parse(argv: list[str]) -> tuple[CompareConfig, str]:
    """The config, and the resolved recipe as YAML (for the report)."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    given = {arg.split("=")[0][len("--budget."):] for arg in argv if arg.startswith("--budget.")}
    if given:  # a budget on the command line replaces the recipe's, whatever its kind
        for name in ("tokens", "flops", "minutes"):
            if name not in given:
                namespace[f"budget.{name}"] = None
    recipe = parser.dump(namespace, skip_none=False)
    init = parser.instantiate(namespace)
    fields = {name: init[name] for name in CompareConfig.__dataclass_fields__}
    return CompareConfig(**fields), recipe


def compare(argv: list[str]) -> None:
    config, recipe = parse(argv)
    report = run_comparison(config, recipe)
    print(report.resolve(), flush=True)


def say(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


# --- the comparison --------------------------------------------------------------------------------


def run_comparison(config: CompareConfig, recipe: str = "") -> Path:
    """Train every arm for every seed, evaluate, probe, and write the report into ``config.out``.
    Returns the path of ``report.md``."""
    config.check()
    out = Path(config.out).resolve()
    check_destination(
        out, label="--out", what="a comparison", owned=OUTPUTS, overwrite_flag="--overwrite true",
        overwrite=config.overwrite,
    )
    probe_set = load_probe_set(config.probe)  # a bad probe file stops before any training
    # Until every arm is known to build and fit its budget, OUT stays as it was: a tokenizer
    # trained here waits in a hidden sibling folder.
    with staging_tokenizer(config, out) as staged:
        held_out = load_held_out(config.data, TokenizerInfo.load(staged), config.eval)
        sizes = {arm.name: arm_size(arm, config, staged) for arm in config.arms}
        steps = budget_steps(config, staged, sizes)
        clear_out(out, keep=None if config.data.tokenizer is None else Path(config.data.tokenizer))
        tokenizer = config.data.tokenizer or str(Path(staged).rename(out / "tokenizer"))
    info = TokenizerInfo.load(tokenizer)
    if torch.cuda.is_available() and config.train.accelerator != "cpu":
        torch.set_float32_matmul_precision("high")
    context = run_context(config, info, held_out, probe_set)
    results = {arm.name: arm_entry(arm, sizes[arm.name]) for arm in config.arms}
    for seed in range(config.seeds):
        for arm in config.arms:
            say(f"seed {seed}, arm {arm.name} ({arm.family}, {arm.objective_name}): {steps[arm.name]} steps")
            run = train_arm(arm, config, tokenizer, seed, steps[arm.name], sizes[arm.name].flops)
            results[arm.name]["runs"].append(measure(run, arm.objective_name, config, out, seed, arm.name, held_out, info, probe_set))
            write_metrics(out / "metrics.json", build_metrics(results, context))  # partial results survive a crash
    report = write_report(out, build_metrics(results, context), recipe)
    write_metrics(out / "metrics.json", build_metrics(results, context))
    return report


OUTPUTS = frozenset({"report.md", "metrics.json", "loss_vs_tokens.png", "loss_vs_flops.png", "probe_accuracy.png",
                     "bits_per_byte.png", "tokenizer", "arms"})
"""What a comparison writes into OUT: all that ``--overwrite true`` may replace."""


@contextmanager
def staging_tokenizer(config: CompareConfig, out: Path):
    """The tokenizer every arm uses: the one given, or one trained once on the corpus into a
    hidden sibling of OUT (removed on the way out unless the caller has moved it into OUT)."""
    sentinels = sentinels_needed(config)
    if config.data.tokenizer is not None:
        check_given_tokenizer(TokenizerInfo.load(config.data.tokenizer), config, sentinels)
        yield config.data.tokenizer
        return
    say(f"training a {config.tokenizer.kind} tokenizer ({config.tokenizer.vocab_size} tokens"
        + (f", {sentinels} sentinels" if sentinels else "") + ") on the corpus")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tokenizer-{uuid.uuid4().hex[:8]}"
    try:
        yield str(train_tokenizer(
            config.data.paths, staging, kind=config.tokenizer.kind, vocab_size=config.tokenizer.vocab_size,
            family=TOKENIZER_STYLE, text_field=config.data.text_field, errors=config.data.errors, sentinels=sentinels,
        ))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def clear_out(out: Path, keep: Path | None) -> None:
    """Remove a previous comparison's outputs from OUT (``check_destination`` allowed it), or create it;
    ``keep`` (a given tokenizer, which may be the previous comparison's) stays."""
    out.mkdir(parents=True, exist_ok=True)
    keep = None if keep is None else keep.resolve()
    for path in out.iterdir():
        if path.name not in OUTPUTS or (keep is not None and keep.is_relative_to(path.resolve())):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def sentinels_needed(config: CompareConfig) -> int:
    """Sentinels the span arms need: one per hidden span of a block; none without span arms."""
    if not any(arm.objective_name == "span" for arm in config.arms):
        return 0
    _, spans = noise_counts(config.data.block_size, config.model.span)
    return spans


def check_given_tokenizer(info: TokenizerInfo, config: CompareConfig, sentinels: int) -> None:
    """Refuse a ``--data.tokenizer`` that some arm cannot use, before anything trains."""
    path = config.data.tokenizer
    if info.mask_id is None and any(arm.objective_name == "mlm" for arm in config.arms):
        raise ScratchLMError(
            f"--data.tokenizer {path} has no mask token, which the MLM arms need; train one with BERT-style "
            "specials (scratchlm tokenizer train --family modernbert ...)"
        )
    if not sentinels:
        return
    tokenizer = info.tokenizer()
    found = next(i for i in itertools.count() if tokenizer.token_to_id(SENTINEL.format(i)) is None)
    if found < sentinels:
        lack = (f"{found} sentinel tokens ({SENTINEL.format(0)}, ...) where the span arms need {sentinels}, "
                f"one per masked span of a {config.data.block_size}-token block")
    elif info.eos_id is None:
        lack = "no end-of-text token, which span corruption closes its sequences with"
    else:
        return
    raise ScratchLMError(
        f"--data.tokenizer {path} has {lack}; train one with BERT-style specials and sentinels (scratchlm "
        f"tokenizer train --family modernbert --sentinels {sentinels} ...), or leave --data.tokenizer unset"
    )


def budget_steps(config: CompareConfig, tokenizer: str, sizes: dict[str, ArmSize]) -> dict[str, int]:
    tokens_per_step = block_tokens_per_step(config)
    steps = {}
    for arm in config.arms:
        seconds = seconds_per_step(arm, config, tokenizer) if config.budget.minutes is not None else None
        steps[arm.name] = steps_for_budget(config.budget, sizes[arm.name].flops, tokens_per_step, seconds)
    return steps


def run_context(config: CompareConfig, info: TokenizerInfo, held_out: HeldOut, probe_set: ProbeSet) -> dict[str, Any]:
    """What every arm shares, for metrics.json and the report."""
    budget = {k: v for k, v in asdict(config.budget).items() if v is not None}
    return {
        "corpus": describe_sources(resolve_sources(config.data.paths)),
        "tokenizer": {"path": info.path, "kind": config.tokenizer.kind if config.data.tokenizer is None else "given",
                      "vocab_size": info.vocab_size, "sentinels_used": sentinels_needed(config)},
        "budget": ", ".join(f"{v:g} {k}" for k, v in budget.items()),
        "seeds": config.seeds,
        "block_size": config.data.block_size,
        "batch_size": config.data.batch_size,
        "eval": {"documents": len(held_out.texts), "doc_tokens": config.eval.doc_tokens, "tokens": held_out.n_tokens,
                 "bytes": held_out.n_bytes, "window": held_out.window},
        "probe": {"source": probe_set.source, "labels": probe_set.labels, "train": len(probe_set.train),
                  "test": len(probe_set.test), "majority_label": probe_set.majority_label,
                  "majority_rate": probe_set.majority_rate},
        "versions": versions(),
    }


def arm_entry(arm: Arm, size: ArmSize) -> dict[str, Any]:
    return {
        "family": arm.family,
        "objective": arm.objective_name,
        "params": size.params,
        "params_non_embedding": size.params_non_embedding,
        "shape": size.shape,
        "flops_per_token": size.flops.per_token,
        "flop_count": {**asdict(size.flops), "attention": size.flops.attention},
        "runs": [],
    }


def measure(run: ArmRun, objective: str, config: CompareConfig, out: Path, seed: int, name: str,
            held_out: HeldOut, info: TokenizerInfo, probe_set: ProbeSet) -> dict[str, Any]:
    """Export one trained arm, score it on the held-out text and probe its export."""
    folder = TrainedModel.from_module(run.module).export(out / "arms" / name / f"seed{seed}" / "hf", overwrite=True)
    device = probe_device(config.train.accelerator)
    model = run.module.model.to(device)
    say(f"seed {seed}, arm {name}: held-out evaluation ({held_out.n_tokens} tokens)")
    metrics = evaluate_arm(model, objective, held_out, info, config.eval, span=config.model.span)
    metrics["val_loss"] = run.curve[-1].val_loss
    model.cpu()
    say(f"seed {seed}, arm {name}: probe ({len(probe_set.train)} training examples)")
    metrics.update(run_probes(folder, probe_set, config.probe, seed, device))
    say(f"seed {seed}, arm {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return {
        "seed": seed,
        "steps": run.steps,
        "tokens": run.tokens,
        "flops": run.flops,
        "train_seconds": run.train_seconds,
        "tokens_per_second": run.tokens_per_second,
        "hf": str(folder),
        "curve": [asdict(point) for point in run.curve],
        "metrics": metrics,
    }
