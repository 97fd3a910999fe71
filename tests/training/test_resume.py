"""A run killed with SIGKILL and resumed from its last checkpoint is the run it would have been."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runs import RECIPES, ROOT, run_main
from scratchlm.cli import main

RESUME_REL_TOL = 1e-5
"""How far a resumed step's loss may be from the uninterrupted run's, relative. Resuming with the
wrong generator state (other dropout masks) moved this test's losses by 3e-5 to 3e-3 relative at
every step from 8 to 15 (another batch's loss lies 1e-3 to 1e-2 away). Equal bit for bit is too
strict: on a loaded machine, 1 of 20 uninterrupted runs of the same command logged its first
step's loss 1.7e-6 away from the others (every later step equal bit for bit), and 2 of about 25
resumed runs their first step's 1.8e-6 away. Likely MKL's: with ``MKL_CBWR=AUTO,STRICT`` (its
run-to-run reproducible mode) none of 40 uninterrupted runs on the same loaded machine differed."""

SMALL = [
    "--model.arch", "{n_layers: 1, d_model: 32, n_heads: 2, d_ff: 64}",
    "--data.block_size", "32", "--data.batch_size", "4", "--data.shuffle_buffer", "8",
    "--trainer.max_steps", "16", "--trainer.val_check_interval", "8", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "tok"
    main(["tokenizer", "train", "--family", "bert", "--vocab-size", "500", "--out", str(out)])
    return out


def fit_args(root: Path, tokenizer: Path, workers: int, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(RECIPES / "bert-tiny.yaml"),
        "--trainer.default_root_dir", str(root), "--data.tokenizer", str(tokenizer),
        "--data.num_workers", str(workers), *SMALL, *extra,
    ]


def train_losses(root: Path, version: int | None = None) -> dict[int, str]:
    """step -> train/loss exactly as logged (text), over all versions or in one."""
    losses = {}
    for path in sorted(root.glob(f"logs/version_{'*' if version is None else version}/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = row["train/loss"]
    return losses


def kill_after_first_checkpoint(args: list[str], checkpoint: Path) -> None:
    """Run ``scratchlm ARGS`` in a process of its own and SIGKILL it once ``checkpoint`` exists."""
    command = [sys.executable, "-m", "scratchlm", *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within two minutes"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_and_resumed_run_logs_the_same_losses(tmp_path, tokenizer, workers, capsys):
    # Only the killed run needs a process of its own; the others run in this one (each start of
    # the command spends most of its time importing Lightning).
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_main(capsys, *fit_args(whole, tokenizer, workers))
    reference = train_losses(whole)
    assert sorted(reference) == list(range(16))

    kill_after_first_checkpoint(fit_args(broken, tokenizer, workers), broken / "checkpoints" / "last.ckpt")
    run_main(capsys, *fit_args(broken, tokenizer, workers, "--ckpt_path", "last"))
    assert min(train_losses(broken, version=1)) == 8, "the second start went on from the checkpoint"
    after = train_losses(broken)
    resumed_steps = [step for step in after if step >= 8]
    assert resumed_steps and max(resumed_steps) == 15
    for step in resumed_steps:
        assert math.isclose(float(after[step]), float(reference[step]), rel_tol=RESUME_REL_TOL), (
            f"step {step}: {after[step]} != {reference[step]}"
        )

    # The same checkpoint cannot be continued exactly with another number of workers: refuse.
    other = 2 if workers == 0 else 0
    refused = run_main(capsys, *fit_args(whole, tokenizer, other, "--ckpt_path", "last", "--trainer.max_steps", "20"),
                       check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"num_workers {workers} -> {other}" in refused.stderr
