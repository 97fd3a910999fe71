"""A kill while a checkpoint or an export is being written never costs the last good one."""

import hashlib
import os
from pathlib import Path
import subprocess
import sys

import torch

from runs import RECIPES, ROOT, run_main
from scratchlm.training import TrainedModel
from scratchlm.training.checkpoint_io import AtomicCheckpointIO

# Runs the real command with one writer replaced: on its Nth call it writes half of what it would
# and then SIGKILLs its own process, as a pre-emption in the middle of a write would.
KILL_DURING_CHECKPOINT = """
import io, os, signal, sys
import torch
from scratchlm.cli import main

kill_at, calls, real_save = int(os.environ["KILL_AT"]), 0, torch.save

def save_then_die(obj, f, *args, **kwargs):
    global calls
    if isinstance(obj, dict) and "state_dict" in obj:
        calls += 1
        if calls == kill_at:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_then_die
main(sys.argv[1:])
"""

KILL_DURING_EXPORT = """
import os, signal, sys
import scratchlm.export.hf as hf
from scratchlm.cli import main

real_save_file = hf.save_file

def save_file_then_die(tensors, filename, *args, **kwargs):
    real_save_file(tensors, filename, *args, **kwargs)
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

hf.save_file = save_file_then_die
main(sys.argv[1:])
"""

SMALL = [
    "--model.arch", "{n_layers: 1, d_model: 32, n_heads: 2, d_ff: 64}",
    "--tokenizer.vocab_size", "400", "--data.block_size", "32", "--data.batch_size", "4",
    "--trainer.max_steps", "8", "--trainer.val_check_interval", "4",
    "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
]


def run_script(script: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(script)
    return subprocess.run(
        [sys.executable, str(driver), *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, **env},
    )


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_kill_while_last_ckpt_is_written_leaves_the_previous_one_and_resume_works(tmp_path, capsys):
    root = tmp_path / "run"
    fit = ["fit", "--config", str(RECIPES / "gpt2-tiny.yaml"), "--trainer.default_root_dir", str(root), *SMALL]
    # Saves at step 4: step=4.ckpt (1), last.ckpt (2); at step 8: step=8.ckpt (3), last.ckpt (4).
    killed = run_script(KILL_DURING_CHECKPOINT, tmp_path, *fit, KILL_AT="4")
    assert killed.returncode == -9, killed.stderr

    checkpoints = root / "checkpoints"
    last = TrainedModel.from_checkpoint(checkpoints / "last.ckpt")
    assert last.record["steps"] == 4  # the previous last.ckpt, whole
    for path in checkpoints.glob("*.ckpt"):
        torch.load(path, map_location="cpu", weights_only=False)  # no torn file under a real name
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")], "the torn write stays hidden"

    resumed = run_main(capsys, *fit, "--ckpt_path", "last")
    assert resumed.stdout.strip().splitlines()[-1] == str((root / "hf").resolve())
    assert TrainedModel.from_checkpoint(checkpoints / "last.ckpt").record["steps"] == 8
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "leftovers are cleared"


def test_a_kill_while_exporting_over_a_folder_leaves_the_old_export(gpt2_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, root, _ = gpt2_run
    checkpoint = str(root / "checkpoints" / "last.ckpt")
    out = tmp_path / "export"
    run_main(capsys, "export", checkpoint, str(out))
    before = digests(out)

    killed = run_script(KILL_DURING_EXPORT, tmp_path, "export", checkpoint, str(out), "--overwrite")
    assert killed.returncode == -9, killed.stderr
    assert digests(out) == before
    AutoModelForCausalLM.from_pretrained(out)


def test_save_replaces_a_checkpoint_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_export_of_a_folder_or_an_unreadable_file_names_what_to_give(tmp_path):
    import pytest

    from scratchlm.errors import ScratchLMError
    from scratchlm.training.checkpoint_io import check_checkpoint_file

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"not a zip")
    with pytest.raises(ScratchLMError, match=r"checkpoints is a folder; give one checkpoint file in it \(last\.ckpt\)"):
        TrainedModel.from_checkpoint(folder)
    with pytest.raises(ScratchLMError, match=r"last\.ckpt cannot be read \(not a complete torch\.save archive\)"):
        check_checkpoint_file(folder / "last.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "good.ckpt")
    check_checkpoint_file(tmp_path / "good.ckpt")  # a whole archive passes
