"""Comparing pre-training objectives on the same corpus at matched compute.

``scratchlm compare`` trains several *arms* (a model family and an objective: an MLM encoder, a
causal decoder and a T5 encoder-decoder with span corruption, of the same width and depth) on one
tokenizer and one token stream, in the same order, to the same budget (tokens, FLOPs or minutes),
for one or more seeds; scores every arm on the same held-out bytes (bits per byte; MLM and
span-corruption accuracy; perplexity); probes each arm's exported Hugging Face folder on a
labeled task; and writes ``report.md``, ``metrics.json`` and plots.

- ``config``: the recipe and command-line schema.
- ``arms``: building the arms, counting their FLOPs, training each to the budget.
- ``evaluate``: held-out bits per byte (next-token likelihood, pseudo-log-likelihood of MLM and
  of span corruption), MLM and span-corruption accuracy, perplexity.
- ``probe_data`` and ``probe``: the labeled set and its split; fine-tuning and linear probes.
- ``report``: metrics.json, report.md and the plots.
- ``command``: the command line and the comparison as a table of contents.
"""

from scratchlm.compare.command import compare, run_comparison
from scratchlm.compare.config import Arm, Budget, CompareConfig

__all__ = ["Arm", "Budget", "CompareConfig", "compare", "run_comparison"]
