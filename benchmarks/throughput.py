"""Training throughput of scratchlm's models against the matching Hugging Face class, in one process.

For each model family and precision, both models take full training steps (forward, loss, backward,
AdamW step, zero_grad) on the same random tokens, in alternating rounds after a warm-up, and the
median tokens/s of each is printed with their ratio and scratchlm's model FLOPs utilisation:

    family=<f> dtype=<d> seq=<T> scratchlm_tok_s=<x> hf_tok_s=<y> ratio=<x/y> mfu=<m>

Lines starting with ``#`` are comments: the machine, the fixed model config, and for every case a
loss check (both models hold the same weights, so their first losses must agree: the comparison is
of one architecture, not two) and each side's minor page faults per step (fresh memory the OS
zero-fills on first touch: on CPU a real part of a step's cost, and of the gap between the two).

What is compared
----------------
- The model: one fixed config, so results compare across commits: vocabulary 8192, d_model 256,
  4 layers, 4 heads, MLP width 1024 (GELU MLPs of bert and gpt2) or 688 (the gated MLPs of llama's
  SwiGLU and modernbert's GeGLU: ~8/3·d_model, which costs what a 4·d_model GELU MLP costs;
  Shazeer 2020, §2), llama with n_kv_heads = 4 (plain multi-head attention), modernbert with its
  default local window of 128. Dropout is 0.0 in both models, so no dropout kernel runs in either
  and the losses can be compared; ``--dropout P`` sets it in both (every dropout the config has:
  embeddings, attention probabilities, sublayer outputs), as the GPT-2 and BERT presets train
  (0.1), and the first losses then differ by the masks drawn.
- The HF model: ``TARGETS[family].hf_class`` built from ``TARGETS[family].hf_config(config,
  special_ids)`` (the export's own config, so the architecture is identical) with
  ``attn_implementation="sdpa"``, in train mode, loaded with our initial weights. ``use_cache`` is
  off for the causal classes (a KV cache has no use in training).
- The objective, as each library's users train:
  MLM (bert, modernbert): 15% of positions chosen and corrupted by ``MaskedLM.collate``; ours runs
  ``MaskedLM.loss`` (the head on the chosen positions only); HF gets ``(input_ids,
  attention_mask, labels)`` with -100 at the positions not chosen (the head on every position).
  CLM (gpt2, llama, modernbert-causal): ours ``CausalLM.loss`` on ``CausalLM.collate``'s batch; HF
  ``(input_ids, labels=input_ids)`` (it shifts the labels itself).
  Our batch is what the training loop gets: one packed document per block, no padding, and the
  collate's ``attention_mask`` (all True) and ``doc_ids`` passed along.
- Precision: ``fp32``, or ``bf16`` = ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward
  and loss in both (weights and AdamW states stay fp32).
- Optimizer: ``torch.optim.AdamW(lr=1e-4, fused=True)`` for both: the fused kernel is what our
  training builds (``training.optim.build_optimizer``) and what ``transformers.Trainer`` uses by
  default (``optim="adamw_torch_fused"``).
- Tokens/s counts every token of the batch (B·T). Sequence 128 runs batch 32; by default the
  batch is 4096 // seq on CPU, so every case trains on 4096 tokens a step (batch 8 at seq 512),
  and 16384 // seq on a GPU.
- Device (``--device``): both models, the batch and the optimizer states on the CPU or the GPU;
  GPU rounds are timed between ``torch.cuda.synchronize()`` calls, with no host read of the loss
  inside them (until 2026-11-27 each step read its loss, a wait for the GPU per step; GPU results
  from before then carry that wait on both sides). ``--preset`` replaces the fixed
  config by a named size of each family (``base``: GPT-2 small's width and depth), ``--docs``
  packs several documents into each block with attention kept inside each (CLM only: our
  ``CausalLM(document_masks=True)``; HF the same mask as a 4D boolean ``attention_mask``).
- Compilation: none by default (eager against eager). ``--compile ours`` compiles our model as
  ``--model.compile true`` does in training (``nn.Module.compile()``, inductor; the loss stays
  eager), ``--compile both`` compiles the HF model too, as ``Trainer(torch_compile=True)`` would.
  Compilation happens in the warm-up steps and is not timed; the header says which side ran compiled.
  ``--loss-chunk triton`` or ``eager`` runs our loss's softmax work per chunk in the Triton kernel
  (``kernels.triton_loss``) or in eager blocks on this device, whatever
  ``objectives.cross_entropy.TRITON_SOFTMAX`` says (``default``: as it says; CUDA takes the
  kernel, CPUs the eager blocks).

MFU (model FLOPs utilisation)
-----------------------------
``mfu = scratchlm_tok_s · flops_per_token / peak``, where ``peak`` is the best FLOP/s of a large
square matmul (``--peak-size``, 2048 by default on CPU, 8192 on a GPU) timed by this script on this
machine, in the case's dtype, with the same threads: at start for the header, and (best of two)
at the start of each round, before either side's steps, the MFU being the median over rounds of
our FLOP/s in the round over its peak (on a shared machine whose speed moves from second to
second, a peak timed once at start made MFUs above 1 when that moment was slow). On a GPU with
a known data sheet, bf16 cases also print ``mfu_spec``: the same FLOPs over NVIDIA's dense bf16
figure. Training FLOPs per token follow Kaplan et al. 2020 (§2.1) with the attention term of
the PaLM paper (Chowdhery et al. 2022, appendix B):

    flops_per_token = 6·N_blocks + 6·N_head·s + 12·L·T·D

- ``N_blocks``: weights of every ``nn.Linear`` in the blocks (biases, norms and embedding lookups
  left out: no matmul). 6 = 2 FLOPs per multiply-add × 3 (forward, backward to the inputs,
  backward to the weights).
- ``N_head``: the LM/MLM head's matmuls, counted honestly as our model runs them: the V×D
  decoder (the tied embedding matrix, or llama's untied head) plus the head's own dense layer
  (bert, modernbert), times ``s``, the share of positions the head runs on: all of them for CLM,
  the chosen 15% for MLM (measured on the batch). Work HF does beyond that (the MLM head on every
  position) is not model FLOPs and does not count. The same goes for bert's last block, which
  runs its queries, output projection and MLP on the chosen positions only (keys and values on
  all): those weights count on the chosen share.
- ``12·L·T·D``: attention scores (Q·Kᵀ) and the weighted sum (A·V), 2·T·D FLOPs each per token and
  layer in the forward pass, ×3 with the backward. As in PaLM, the whole T×T is counted for causal
  and windowed attention too, though a fused kernel may skip the masked half.
"""

import argparse
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
import functools
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn
import transformers

from scratchlm.export.hf import TARGETS
from scratchlm.models import FAMILIES, build_config, build_model
from scratchlm.models.layers import build_attention_mask, positions_in_documents
from scratchlm.objectives import cross_entropy
from scratchlm.objectives.clm import CausalLM
from scratchlm.objectives.mlm import MaskedLM
from scratchlm.training.callbacks import BF16_PEAK_FLOPS
from scratchlm.tokenizer import STYLE_OF_FAMILY, TokenizerInfo

VOCAB = 8192
"""Vocabulary of every benchmarked model."""

SHARED_ARCH = dict(d_model=256, n_layers=4, n_heads=4)
"""Config fields every family gets (dropout comes from ``--dropout``, 0.0 by default: a clean comparison)."""

FAMILY_ARCH: dict[str, dict] = {
    "bert": dict(d_ff=1024),
    "gpt2": dict(d_ff=1024),
    "llama": dict(d_ff=688, n_kv_heads=4),
    "modernbert": dict(d_ff=688),
    "modernbert-causal": dict(d_ff=688),
}
"""The benchmarked families, in print order, and their own fields. A family that is not registered
in ``scratchlm.models.FAMILIES`` is skipped without a line."""

SPECIAL_IDS: dict[str, dict[str, int]] = {
    "bert": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
    "gpt": {"eos": 0, "bos": 0, "pad": 1, "unk": 2},
}
"""Token ids of the special tokens, per tokenizer style (as ``scratchlm.tokenizer`` assigns them)."""

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
"""--dtype -> autocast dtype (None: no autocast)."""

PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

COMPILED = {"none": "neither model (eager)", "ours": "scratchlm's model only", "both": "both models"}
"""--compile -> what the header says."""

TOKENS_PER_STEP = {"cpu": 4096, "cuda": 16384}
"""The default batch is TOKENS_PER_STEP[device] // seq: on CPU 32 at seq 128, 8 at seq 512; on a GPU
16 at seq 1024."""

PEAK_SIZE = {"cpu": 2048, "cuda": 8192}
"""Default side of the square matmul timed for the peak, per device type."""

DOC_MASK_FAMILIES = ("gpt2", "llama")
"""Families for which ``--docs`` has an HF equivalent that computes the same loss: the causal
document mask as a 4D boolean attention mask, and (llama) positions restarting in each document."""


# --- the two sides of a case ---------------------------------------------------------------------


@dataclass
class Side:
    """One model with its optimizer and the closure that computes its loss on the fixed batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]


def special_ids_of(family: str) -> dict[str, int]:
    return SPECIAL_IDS[STYLE_OF_FAMILY[family]]


def tokenizer_info(family: str, vocab: int = VOCAB) -> TokenizerInfo:
    """What the objectives need to know of a tokenizer, without one on disk."""
    ids = special_ids_of(family)
    return TokenizerInfo(
        path="(synthetic)",
        vocab_size=vocab,
        **{f"{role}_id": ids.get(role) for role in ("pad", "eos", "bos", "mask", "cls", "sep", "unk")},
        special_ids=tuple(sorted(set(ids.values()))),
        model_max_length=None,
        file_texts={},
    )


def random_batch(objective, batch: int, seq: int, seed: int, vocab: int = VOCAB, docs: int = 1) -> dict[str, torch.Tensor]:
    """The objective's collate of ``batch`` random blocks of ``seq`` ordinary tokens, each block
    ``docs`` packed documents of (nearly) equal length."""
    rng = np.random.default_rng(seed)
    first_ordinary = 5  # above every special id of both styles
    doc_ids = np.repeat(np.arange(docs, dtype=np.int32), [len(part) for part in np.array_split(np.arange(seq), docs)])
    blocks = [
        {
            "input_ids": rng.integers(first_ordinary, vocab, seq, dtype=np.int64),
            "doc_ids": doc_ids,
            "sample_seed": np.asarray([seed, 0, i], dtype=np.int64),
        }
        for i in range(batch)
    ]
    return objective.collate(blocks)


def hf_inputs(family: str, batch: dict[str, torch.Tensor], docs: int = 1) -> dict[str, torch.Tensor]:
    """The arguments an HF user passes for the same batch: MLM labels with -100 where nothing is
    predicted; for CLM the inputs themselves as labels (HF shifts them). With packed documents
    (``docs`` > 1, CLM), the causal document mask as a 4D boolean attention mask, labels with
    -100 where a document's first token would be the previous one's target, and for rotary models
    positions that restart in each document: what our model computes."""
    if FAMILIES[family].objective == "mlm":
        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(), labels=batch["labels"])
    if docs == 1:
        return dict(input_ids=batch["input_ids"], labels=batch["input_ids"])
    labels = torch.full_like(batch["labels"], -100)
    labels[:, 1:] = batch["labels"][:, :-1]  # HF scores logits[t] against labels[t + 1]
    inputs = dict(
        input_ids=batch["input_ids"],
        attention_mask=build_attention_mask(None, causal=True, doc_ids=batch["doc_ids"]),
        labels=labels,
    )
    if family == "llama":
        inputs["position_ids"] = positions_in_documents(batch["doc_ids"])
    return inputs


def build_sides(
    family: str,
    batch_size: int,
    seq: int,
    seed: int,
    compile: str = "none",
    *,
    device: str = "cpu",
    preset: str = "bench",
    vocab: int = VOCAB,
    docs: int = 1,
    dropout: float = 0.0,
) -> tuple[Side, Side, float]:
    """(scratchlm side, HF side, share of positions our head runs on) for one family, on ``device``.

    ``preset`` "bench" is the fixed benchmark config (module docstring); any other is the family's
    named size (``tiny``, ``small``, ``base``) with ``vocab``; ``dropout`` in either."""
    torch.manual_seed(seed)
    spec = FAMILIES[family]
    if preset == "bench":
        config = build_config(
            family, "tiny", vocab_size=vocab, max_positions=max(512, seq),
            dropout=dropout, **SHARED_ARCH, **FAMILY_ARCH[family],
        )
    else:
        max_positions = max(spec.presets[preset].get("max_positions", seq), seq)
        config = build_config(family, preset, vocab_size=vocab, dropout=dropout, max_positions=max_positions)
    ours = build_model(family, config).train()
    info = tokenizer_info(family, vocab)
    objective = MaskedLM(info) if spec.objective == "mlm" else CausalLM(info, document_masks=docs > 1)
    batch = random_batch(objective, batch_size, seq, seed, vocab, docs)

    target = TARGETS[family]
    hf_config = target.hf_config(config, special_ids_of(family))
    hf_config.use_cache = False
    hf = target.hf_class._from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32).train()
    hf.load_state_dict(target.hf_state_dict(ours), strict=False)  # HF ties the decoder itself
    inputs = hf_inputs(family, batch, docs)

    scored = (batch["labels"] != -100).float().mean().item() if spec.objective == "mlm" else 1.0
    ours, hf = ours.to(device), hf.to(device)
    batch, inputs = on_device(batch, device), on_device(inputs, device)
    if compile in ("ours", "both"):
        ours.compile()
    if compile == "both":
        hf.compile()
    return (
        Side(ours, adamw(ours), lambda: objective.loss(ours, batch)[0]),
        Side(hf, adamw(hf), lambda: hf(**inputs).loss),
        scored,
    )


def on_device(tensors: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


# --- timing --------------------------------------------------------------------------------------


def autocast(dtype: str, device: str):
    return torch.autocast(device, dtype=DTYPES[dtype]) if DTYPES[dtype] is not None else nullcontext()


def device_of(side: Side) -> str:
    return next(side.model.parameters()).device.type


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(side: Side, dtype: str) -> torch.Tensor:
    """One full training step; returns the loss, unread: on a GPU the host goes on queueing the
    next step while this one runs, as in a training loop that reads the loss only to log it
    (Lightning with our module, HF's Trainer). Rounds synchronise at their ends."""
    with autocast(dtype, device_of(side)):
        loss = side.loss()
    loss.backward()
    side.optimizer.step()
    side.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def timed_round(side: Side, dtype: str, steps: int, tokens_per_step: int) -> float:
    """Tokens/s over ``steps`` consecutive training steps."""
    synchronize(device_of(side))
    start = time.perf_counter()
    for _ in range(steps):
        train_step(side, dtype)
    synchronize(device_of(side))
    return steps * tokens_per_step / (time.perf_counter() - start)


def first_losses(ours: Side, hf: Side, dtype: str) -> tuple[float, float]:
    """Both models' loss on the batch before any step: equal up to rounding when the HF model
    computes what ours does."""
    with torch.no_grad(), autocast(dtype, device_of(ours)):
        return ours.loss().item(), hf.loss().item()


def compare(
    ours: Side, hf: Side, dtype: str, args, tokens_per_step: int, peak: Callable[[], float]
) -> tuple[float, float, tuple[int, int], list[float], float]:
    """Median tokens/s of (ours, HF): warm-up steps for each, then ``args.rounds`` rounds of
    ``args.steps`` steps, the order alternating (AB, BA, ...) so that neither side always runs in
    the other's wake (caches, turbo, a neighbour's load). Also each side's minor page faults per
    timed step: memory the OS had to hand out afresh (zero-filled on first touch), a cost on
    CPU that tokens/s include; each round's ratio (ours over HF, the two sides' rounds run
    back to back), whose spread shows how much the machine's speed moved during the case; and
    the median over rounds of our tokens/s over the matmul peak that ``peak()`` times at the
    start of each round (FLOP/s, for the MFU: on a machine whose speed moves, the peak of another
    moment would make the ratio of two moments)."""
    for _ in range(args.warmup):
        train_step(ours, dtype)
        train_step(hf, dtype)
    ours_rates, hf_rates, per_peak = [], [], []
    faults = {id(ours): 0, id(hf): 0}
    for round_index in range(args.rounds):
        round_peak = peak()  # before both sides' rounds, whichever goes first (the order alternates)
        order = [(ours, ours_rates), (hf, hf_rates)]
        for side, rates in order if round_index % 2 == 0 else reversed(order):
            before = minor_faults()
            rates.append(timed_round(side, dtype, args.steps, tokens_per_step))
            faults[id(side)] += minor_faults() - before
        per_peak.append(ours_rates[-1] / round_peak)
    steps = args.rounds * args.steps
    per_step = (faults[id(ours)] // steps, faults[id(hf)] // steps)
    round_ratios = [a / b for a, b in zip(ours_rates, hf_rates, strict=True)]
    return (
        statistics.median(ours_rates), statistics.median(hf_rates), per_step, round_ratios,
        statistics.median(per_peak),
    )


def minor_faults() -> int:
    """This process's minor page faults so far (0 where the OS does not count them)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def gpu_peak_memory_gib() -> float:
    """Peak allocated GPU memory since the start, in GiB."""
    return torch.cuda.max_memory_allocated() / 2**30


# --- FLOPs and the machine's peak ----------------------------------------------------------------


def linear_weights(module: nn.Module | None, skip_shape: tuple[int, int] | None = None) -> int:
    """Elements of the weights of every ``nn.Linear`` in ``module`` (none for None)."""
    if module is None:
        return 0
    return sum(
        m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear) and tuple(m.weight.shape) != skip_shape
    )


def flops_per_token(model: nn.Module, seq: int, scored: float) -> float:
    """Training FLOPs per token: 6·N_blocks + 6·N_head·scored + 12·L·T·D (see the module docstring),
    with the last block's work outside its keys and values on the scored share too when the
    model computes it at the masked positions only (``takes_positions``, MLM)."""
    config = model.config
    V, D, L = config.vocab_size, config.d_model, config.n_layers
    n_blocks = linear_weights(model.blocks)
    # The decoder is V×D whether tied to the embedding or a separate Linear (counted once); the
    # head's own dense layer (bert, modernbert) runs on the same positions as the decoder.
    n_head = V * D + linear_weights(getattr(model, "head", None), skip_shape=(V, D))
    sparse_tail = scored < 1.0 and getattr(model, "takes_positions", False)
    n_tail = linear_weights(model.blocks[-1]) - 2 * D * D if sparse_tail else 0
    attention_layers = L - 1 + scored if sparse_tail else L
    return 6 * (n_blocks - n_tail) + 6 * (n_head + n_tail) * scored + 12 * attention_layers * seq * D


def matmul_peak(dtype: torch.dtype, size: int, repeats: int = 5, device: str = "cpu") -> float:
    """Best FLOP/s of a (size × size) @ (size × size) matmul over ``repeats`` timings, after one
    untimed call: the ceiling MFU is measured against."""
    a = torch.randn(size, size, dtype=torch.float32, device=device).to(dtype)
    b = torch.randn(size, size, dtype=torch.float32, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def spec_bf16_flops(device: str) -> tuple[str, float] | None:
    """(GPU name, data-sheet dense bf16 FLOP/s) for a GPU in the table that training's ``train/mfu``
    uses (``training.callbacks.BF16_PEAK_FLOPS``), else None: GPU MFU is usually quoted against it."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next(((name, flops) for part, flops in BF16_PEAK_FLOPS.items() if part in name), None)


# --- profiling -----------------------------------------------------------------------------------


def profile_steps(side: Side, dtype: str, rows: int) -> str:
    """The ``rows`` ops with the most self time over two training steps, as a table: CPU time on
    CPU, device time on a GPU. On a GPU a last line sets the kernels' time per step against the
    profiled steps' wall time: a share well under 1 says the GPU waits for the host (launches,
    Python, guards) part of each step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device_of(side) == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        synchronize(device_of(side))
        start = time.perf_counter()
        for _ in range(2):
            train_step(side, dtype)
        synchronize(device_of(side))
        wall_ms = (time.perf_counter() - start) * 1000 / 2
    averages = prof.key_averages()
    if not on_gpu:
        return averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50)
    table = averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90)
    # The kernels' own rows, as the table's total counts them (an op's row repeats the time of the
    # kernels it launched, and a GPU-side annotation such as the optimizer step's spans its kernels).
    kernels = [e for e in averages if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1000 / 2
    return f"{table}\nkernel_ms_per_step={kernel_ms:.2f} wall_ms_per_step={wall_ms:.2f} (profiled) busy={kernel_ms / wall_ms:.2f}"


# --- reporting -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


ALLOCATOR_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
                 "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")
"""Environment variables that change how the process gets memory. HF's CLM step allocates
(B·T, V) fp32 tensors that a default glibc maps fresh and the kernel zero-fills on every step,
so these move its tokens/s by a third while ours stays put (results, 2026-11-26, Run 16): a run's
header names those that are set."""


def allocator() -> str:
    set_vars = [f"{name}={os.environ[name]}" for name in ALLOCATOR_ENV if name in os.environ]
    return " ".join(set_vars) if set_vars else "defaults"


def header(args, peaks: dict[str, float]) -> list[str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    peak_text = " ".join(f"peak_{d}_gflop_s={p / 1e9:.1f}" for d, p in peaks.items())
    gpu = ""
    if args.device == "cuda":
        gpu = f"gpu={torch.cuda.get_device_name()!r} cuda={torch.version.cuda} "
    if args.preset == "bench":
        arch = ", ".join(f"{k}={v}" for k, v in SHARED_ARCH.items()) + f", dropout={args.dropout}"
        model = (
            f"vocab={args.vocab}, {arch}, d_ff=1024 (bert, gpt2) / 688 (gated: llama, modernbert), llama n_kv_heads=4"
        )
    else:
        model = f"each family's {args.preset!r} preset, vocab={args.vocab}, dropout={args.dropout}"
    docs = f"; {args.docs} documents per block (document masks)" if args.docs > 1 else ""
    return [
        f"# cpu={cpu_model()!r} cores={cores} {gpu}torch={torch.__version__} "
        f"transformers={transformers.__version__} threads={torch.get_num_threads()} device={args.device} "
        f"{peak_text} (matmul {args.peak_size}x{args.peak_size}, best of 5)",
        f"# load_average_1_5_15={load_average()}",
        f"# allocator: {allocator()}",
        f"# config: {model}; batch={args.batch} seq={args.seq}{docs}; warmup={args.warmup} "
        f"rounds={args.rounds} steps/round={args.steps}; fused AdamW(lr=1e-4); dropout {args.dropout} in both",
        f"# compiled: {COMPILED[args.compile]}; our loss's softmax chunks: "
        f"{'eager' if cross_entropy.fused_softmax_chunk(args.device, torch.float32) is None else 'triton'} ({args.loss_chunk})",
    ]


def case_line(family: str, dtype: str, seq: int, ours: float, hf: float, mfu: float) -> str:
    return (
        f"family={family} dtype={dtype} seq={seq} scratchlm_tok_s={ours:.0f} hf_tok_s={hf:.0f} "
        f"ratio={ours / hf:.3f} mfu={mfu:.3f}"
    )


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--family", action="append",
        help=f"family to run; repeat or comma-separate (default: every registered one of {', '.join(FAMILY_ARCH)})",
    )
    parser.add_argument("--dtype", action="append", help="fp32 and/or bf16; repeat or comma-separate (default: both)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length T (default 128)")
    parser.add_argument(
        "--batch", type=int,
        help=f"sequences per step (default: {TOKENS_PER_STEP['cpu']} // seq on CPU, {TOKENS_PER_STEP['cuda']} // seq on a GPU)",
    )
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per round (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per model (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first (default 1)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--peak-size", type=int,
        help=f"side of the square matmul timed for the peak (default {PEAK_SIZE['cpu']} on CPU, {PEAK_SIZE['cuda']} on a GPU)",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"],
        help="where both models train (default: cuda when a GPU is visible, else cpu)",
    )
    parser.add_argument(
        "--preset", default="bench",
        help="model size: 'bench', the fixed config of the module docstring (default), or a preset "
        "every chosen family has (tiny, small, base), with --vocab",
    )
    parser.add_argument(
        "--dropout", type=float, default=0.0,
        help="dropout in both models, every place the config has one (default 0.0; the GPT-2 and BERT presets train with 0.1)",
    )
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size (default {VOCAB})")
    parser.add_argument(
        "--docs", type=int, default=1,
        help=f"documents packed in each block, attention kept inside each (CLM: {', '.join(DOC_MASK_FAMILIES)}); default 1",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also print (as # lines) the top ROWS ops of two profiled steps of each model")
    parser.add_argument("--compile", choices=list(COMPILED), default="none",
                        help="torch.compile our model, both models, or none (default)")
    parser.add_argument("--loss-chunk", choices=["default", "triton", "eager"], default="default",
                        help="our loss's softmax work per chunk: as TRITON_SOFTMAX says (default), the Triton kernel or eager blocks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.family = split_choices(parser, "--family", args.family, list(FAMILY_ARCH))
    args.dtype = split_choices(parser, "--dtype", args.dtype, list(DTYPES))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to PyTorch (torch.cuda.is_available() is False)")
    args.batch = args.batch or max(1, TOKENS_PER_STEP[args.device] // args.seq)
    args.peak_size = args.peak_size or PEAK_SIZE[args.device]
    if args.compile != "none":
        args.warmup = max(args.warmup, 2)  # the first step compiles, the second may recompile for grad mode
    for name in ("seq", "batch", "steps", "rounds", "peak_size", "vocab", "docs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout {args.dropout}: must be at least 0 and below 1")
    if args.docs > args.seq:
        parser.error(f"--docs {args.docs}: more documents than positions in a block (--seq {args.seq})")
    if args.docs > 1:
        other = [f for f in args.family if f not in DOC_MASK_FAMILIES]
        if other:
            parser.error(f"--docs runs families {', '.join(DOC_MASK_FAMILIES)} only; drop {', '.join(other)} (--family)")
    if args.preset != "bench":
        lacking = [f for f in args.family if f in FAMILIES and args.preset not in FAMILIES[f].presets]
        if lacking:
            parser.error(f"--preset {args.preset}: no such preset for {', '.join(lacking)}")
    return args


def split_choices(parser, flag: str, given: list[str] | None, choices: list[str]) -> list[str]:
    """Repeated and comma-separated values, checked against ``choices``, in the order of ``choices``."""
    if not given:
        return choices
    values = {v.strip() for item in given for v in item.split(",") if v.strip()}
    unknown = values - set(choices)
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(choices)}")
    return [c for c in choices if c in values]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.loss_chunk == "triton":
        cross_entropy.TRITON_SOFTMAX.add(args.device)
    elif args.loss_chunk == "eager":
        cross_entropy.TRITON_SOFTMAX.discard(args.device)
    peaks = {d: matmul_peak(PEAK_DTYPES[d], args.peak_size, device=args.device) for d in args.dtype}
    print("\n".join(header(args, peaks)), flush=True)
    spec = spec_bf16_flops(args.device)
    for family in (f for f in args.family if f in FAMILIES and f in TARGETS):
        for dtype in args.dtype:
            ours, hf, scored = build_sides(
                family, args.batch, args.seq, args.seed, args.compile,
                device=args.device, preset=args.preset, vocab=args.vocab, docs=args.docs, dropout=args.dropout,
            )
            loss_ours, loss_hf = first_losses(ours, hf, dtype)
            params = sum(p.numel() for p in ours.model.parameters())
            print(f"# check family={family} dtype={dtype} loss_scratchlm={loss_ours:.5f} loss_hf={loss_hf:.5f} "
                  f"head_share={scored:.3f} params={params} load={load_average()}", flush=True)
            peak = functools.partial(matmul_peak, PEAK_DTYPES[dtype], args.peak_size, repeats=2, device=args.device)
            ours_rate, hf_rate, faults, round_ratios, tokens_per_peak = compare(
                ours, hf, dtype, args, args.batch * args.seq, peak
            )
            token_flops = flops_per_token(ours.model, args.seq, scored)
            model_flops = ours_rate * token_flops
            print(case_line(family, dtype, args.seq, ours_rate, hf_rate, tokens_per_peak * token_flops), flush=True)
            print(f"# round_ratios median={statistics.median(round_ratios):.3f} min={min(round_ratios):.3f} "
                  f"max={max(round_ratios):.3f}", flush=True)
            print(f"# page_faults_per_step scratchlm={faults[0]} hf={faults[1]}", flush=True)
            if spec is not None and dtype == "bf16":
                print(f"# mfu_spec={model_flops / spec[1]:.3f} (of {spec[1] / 1e12:.1f} TFLOP/s, the dense bf16 "
                      f"data-sheet figure for {spec[0]})", flush=True)
            if args.device == "cuda":
                print(f"# peak_memory_gib={gpu_peak_memory_gib():.1f} (both models, since start)", flush=True)
            if args.profile:
                for name, side in (("scratchlm", ours), ("hf", hf)):
                    table = profile_steps(side, dtype, args.profile)
                    print("\n".join(f"# [{name}] {row}" for row in table.splitlines()), flush=True)
            del ours, hf
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
