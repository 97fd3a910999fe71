"""Tokens/s and MFU that ``scratchlm fit`` logs, summarised from a run's ``metrics.csv``.

    python benchmarks/fit_speed.py RUN_DIR [--skip 10]

Prints one line: the median of ``train/tok_s`` (and of ``train/mfu`` and ``train/tflops`` where
logged) over the logged steps after the first ``--skip`` (compilation, warm-up), with the number
of rows it read. Set against ``throughput.py``'s bare training steps on the same model, it shows
what the training loop costs around them (the data loader, logging, the non-finite guard)."""

import argparse
import csv
from pathlib import Path
import statistics
import sys


def summarise(run_dir: Path, skip: int) -> str:
    paths = sorted(run_dir.glob("logs/version_*/metrics.csv"))
    if not paths:
        raise SystemExit(f"{run_dir}: no logs/version_*/metrics.csv; is this a scratchlm run folder?")
    with open(paths[-1], newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/tok_s") and int(row["step"]) >= skip]
    if not rows:
        raise SystemExit(f"{paths[-1]}: no train/tok_s logged after step {skip}; train longer or lower --skip")
    parts = [f"rows={len(rows)} steps={rows[0]['step']}..{rows[-1]['step']}"]
    for column in ("train/tok_s", "train/tflops", "train/mfu"):
        values = [float(row[column]) for row in rows if row.get(column)]
        if values:
            parts.append(f"{column.split('/')[1]}={statistics.median(values):.4g}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--skip", type=int, default=10, help="leave out the logged steps before this one")
    args = parser.parse_args(argv)
    print(summarise(args.run_dir, args.skip))


if __name__ == "__main__":
    main(sys.argv[1:])
