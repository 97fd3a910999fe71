"""A run directory belongs to one run."""

import json

import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.training.run_dir import RECORD, claim_run_dir, run_identity

IDENTITY = run_identity({"model": {"family": "gpt2", "size": "tiny", "tokenizer": "a"}, "data": {"num_workers": 0, "block_size": 128}})


def test_identity_is_flat_and_leaves_out_what_may_change_on_resume():
    assert IDENTITY == {"model.family": "gpt2", "model.size": "tiny", "data.block_size": 128}


def test_a_fresh_folder_is_claimed_and_the_same_run_may_come_back(tmp_path):
    claim_run_dir(tmp_path, IDENTITY, resuming=False)
    assert json.loads((tmp_path / RECORD).read_text()) == IDENTITY
    claim_run_dir(tmp_path, IDENTITY, resuming=False)  # killed before its first checkpoint: start again
    claim_run_dir(tmp_path, IDENTITY, resuming=True)


def test_a_different_run_is_refused_naming_what_differs_and_nothing_is_rewritten(tmp_path):
    claim_run_dir(tmp_path, IDENTITY, resuming=False)
    before = (tmp_path / RECORD).read_bytes()
    other = {**IDENTITY, "model.size": "small"}
    for resuming in (False, True):
        with pytest.raises(ScratchLMError, match=r"holds a different run \(model.size: 'tiny' -> 'small'\)"):
            claim_run_dir(tmp_path, other, resuming=resuming)
    assert (tmp_path / RECORD).read_bytes() == before


def test_starting_over_on_checkpoints_is_refused_and_resuming_clears_torn_writes(tmp_path):
    claim_run_dir(tmp_path, IDENTITY, resuming=False)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"good")
    (checkpoints / ".last.ckpt.partial-0123abcd").write_bytes(b"torn")
    with pytest.raises(ScratchLMError, match="--ckpt_path last"):
        claim_run_dir(tmp_path, IDENTITY, resuming=False)
    claim_run_dir(tmp_path, IDENTITY, resuming=True)
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    assert (checkpoints / "last.ckpt").read_bytes() == b"good"
