"""A long streaming training run that watches its own memory and speed.

A pre-training run must hold steady for days: resident memory flat (no corpus, batch or log kept
growing in the main process or the loader workers) and tokens/s steady (no slowdown from a
growing buffer or a leak in the autograd graph). This trains a tiny model on the streaming
pipeline (the corpus repeats endlessly, as in ``fit``) for ``--minutes``, samples every
``--interval`` seconds, and prints one line per sample, then a summary comparing the first fifth
of the run with the last:

    t=<s> step=<n> tok_s=<x> rss_mb=<main> workers_rss_mb=<sum over loader workers>
    soak: minutes=<m> steps=<n> tok_s_start=<x> tok_s_end=<y> speed_ratio=<y/x> rss_start_mb=<a> rss_end_mb=<b> rss_growth_mb=<b-a> workers_rss_start_mb=<c> workers_rss_end_mb=<d>

Memory is read from /proc (Linux). Run from the repository root with the package installed:

    python benchmarks/soak.py --minutes 10 --workers 2
    python benchmarks/soak.py --corpus ../shared/corpora/public-domain-en.jsonl.gz --family bert
"""

import argparse
from pathlib import Path
import statistics
import tempfile
import time

import lightning as L

from scratchlm.data import TextDataModule
from scratchlm.tokenizer import train_tokenizer
from scratchlm.training import PretrainModule


def rss_mb(pid: int | str) -> float:
    """Resident memory of process ``pid`` in MB (0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def children(pid: int | str = "self") -> list[str]:
    """Direct child processes of ``pid`` (the DataLoader workers of this process)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += task.read_text().split()
    return found


class Sampler(L.Callback):
    """Every ``interval`` seconds: tokens/s since the previous sample and the memory now."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: list[dict[str, float]] = []

    def on_train_start(self, trainer, module) -> None:
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = module.tokens_seen

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if now - self.last_time < self.interval:
            return
        sample = {
            "t": now - self.start,
            "step": trainer.global_step,
            "tok_s": (module.tokens_seen - self.last_tokens) / (now - self.last_time),
            "rss_mb": rss_mb("self"),
            "workers_rss_mb": sum(rss_mb(pid) for pid in children()),
        }
        self.samples.append(sample)
        print(
            f"t={sample['t']:.0f} step={sample['step']} tok_s={sample['tok_s']:.0f} "
            f"rss_mb={sample['rss_mb']:.0f} workers_rss_mb={sample['workers_rss_mb']:.0f}",
            flush=True,
        )
        self.last_time, self.last_tokens = now, module.tokens_seen


def summary(samples: list[dict[str, float]], minutes: float) -> str:
    """First fifth of the samples against the last fifth (medians), the first sample left out:
    it includes the workers' start and the first tokenizer calls."""
    steady = samples[1:] if len(samples) > 2 else samples
    fifth = max(1, len(steady) // 5)
    start, end = steady[:fifth], steady[-fifth:]

    def median(part, key):
        return statistics.median(s[key] for s in part)

    tok_start, tok_end = median(start, "tok_s"), median(end, "tok_s")
    rss_start, rss_end = median(start, "rss_mb"), median(end, "rss_mb")
    return (
        f"soak: minutes={minutes:g} steps={samples[-1]['step']} tok_s_start={tok_start:.0f} "
        f"tok_s_end={tok_end:.0f} speed_ratio={tok_end / tok_start:.3f} rss_start_mb={rss_start:.0f} "
        f"rss_end_mb={rss_end:.0f} rss_growth_mb={rss_end - rss_start:+.0f} "
        f"workers_rss_start_mb={median(start, 'workers_rss_mb'):.0f} "
        f"workers_rss_end_mb={median(end, 'workers_rss_mb'):.0f}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="any path scratchlm reads (default: the built-in corpus)")
    parser.add_argument("--family", default="gpt2", help="model family, tiny preset (default gpt2)")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between samples (default 15)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=4096)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    paths = [args.corpus] if args.corpus else None
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = str(train_tokenizer(paths, Path(folder) / "tokenizer", family=args.family, vocab_size=args.vocab_size))
        data = TextDataModule(
            paths=paths, tokenizer=tokenizer, val_fraction=0.0, block_size=args.block_size,
            batch_size=args.batch_size, num_workers=args.workers,
        )
        module = PretrainModule(tokenizer=tokenizer, family=args.family, size="tiny")
        sampler = Sampler(args.interval)
        trainer = L.Trainer(
            max_time={"seconds": args.minutes * 60}, max_steps=10**9, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[sampler], default_root_dir=folder,
        )
        print(f"# soak: family={args.family} corpus={data.describe()} workers={args.workers} "
              f"batch={args.batch_size}x{args.block_size} minutes={args.minutes:g}", flush=True)
        trainer.fit(module, datamodule=data)
    if not sampler.samples:
        raise SystemExit("no sample taken: raise --minutes or lower --interval")
    print(summary(sampler.samples, args.minutes), flush=True)


if __name__ == "__main__":
    main()
