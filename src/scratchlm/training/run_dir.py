"""A run directory belongs to one run: what it trains is recorded in ``run.json`` on the first start,
and a later start that would train something else there, or start over on its checkpoints, stops
before it writes anything.

The identity of a run is what decides its weights and its data: the model's settings, the
tokenizer (given, or the spec of the one trained into the run), the data sources and their cut
into blocks, and the seed. Trainer settings (steps, precision, devices) may change between a run
and its resumption, and so may ``data.num_workers`` (the data module checks that its stream can
continue under the new layout).
"""

from collections.abc import Mapping
import json
from pathlib import Path
from typing import Any

from scratchlm.errors import ScratchLMError
from scratchlm.training.checkpoint_io import stale_partials, write_atomically

RECORD = "run.json"
"""File in the run directory holding the identity of the run it belongs to."""

NOT_IDENTITY = {"data.num_workers", "model.tokenizer"}
"""Settings that may differ between a run and its resumption (``model.tokenizer`` follows
``data.tokenizer``)."""


def run_identity(sections: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``{"model.size": "tiny", ...}`` of the settings that make a run, as JSON values."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif prefix not in NOT_IDENTITY:
            flat[prefix] = json.loads(json.dumps(value, default=str))

    walk("", sections)
    return flat


def claim_run_dir(root: Path, identity: dict[str, Any], resuming: bool) -> bool:
    """Check that a run with ``identity`` may start (``resuming`` or not) in ``root``, then record it.

    Returns:
        Whether this call made the record (``root`` held none): a start that then fails may take
        its claim back with :func:`release_run_dir`.

    Raises:
        ScratchLMError: ``root`` is a file, holds an unreadable record or a different run, or holds
            checkpoints and this start is not a resumption (starting over would replace them).
    """
    if root.exists() and not root.is_dir():
        raise ScratchLMError(f"--trainer.default_root_dir {root} is a file; choose a folder for the run")
    recorded_path = root / RECORD
    created = not recorded_path.is_file()
    if not created:
        try:
            recorded = json.loads(recorded_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ScratchLMError(
                f"{recorded_path} is not valid JSON ({error}); it records which run {root} belongs to: restore "
                "it from a backup, or choose another --trainer.default_root_dir"
            ) from None
        changes = differences(recorded, identity)
        if changes:
            raise ScratchLMError(
                f"run directory {root} holds a different run ({'; '.join(changes[:4])}"
                f"{'; ...' if len(changes) > 4 else ''}); choose another --trainer.default_root_dir, "
                "or delete that folder to start over"
            )
    checkpoints = sorted((root / "checkpoints").glob("*.ckpt")) if (root / "checkpoints").is_dir() else []
    if checkpoints and not resuming:
        raise ScratchLMError(
            f"run directory {root} already holds checkpoints ({checkpoints[-1].name}, ...); pass "
            "--ckpt_path last to continue that run, or choose another --trainer.default_root_dir"
        )
    for leftover in stale_partials(root / "checkpoints"):
        leftover.unlink(missing_ok=True)
    write_atomically(recorded_path, lambda f: f.write((json.dumps(identity, indent=2, sort_keys=True) + "\n").encode()))
    return created


def release_run_dir(root: Path) -> None:
    """Take back the record of a start that failed before training (a typo in a setting, a missing
    file), so that the corrected start may claim ``root``; only for a record that start made."""
    (root / RECORD).unlink(missing_ok=True)


def differences(recorded: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs, in key order."""
    keys = sorted(set(recorded) | set(identity))
    missing = object()
    return [
        f"{key}: {recorded.get(key, '(unset)')!r} -> {identity.get(key, '(unset)')!r}"
        for key in keys
        if recorded.get(key, missing) != identity.get(key, missing)
    ]
