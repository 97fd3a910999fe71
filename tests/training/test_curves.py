"""The run's curves: every start of a resumed run joined by step, drawn into logs/curves.png."""

import csv

from scratchlm.training.curves import run_series, write_curves

COLUMNS = ["epoch", "step", "train/loss", "train/lr", "train/grad_norm", "val/loss"]


def write_metrics(root, version: int, rows: list[dict]) -> None:
    folder = root / "logs" / f"version_{version}"
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({"epoch": 0, **row} for row in rows)


def test_a_resumed_run_is_one_curve_and_retrained_steps_replace_the_first_try(tmp_path):
    write_metrics(tmp_path, 0, [{"step": s, "train/loss": 9.0, "train/lr": 1e-3} for s in range(10)]
                  + [{"step": 4, "val/loss": 8.0}, {"step": 9, "val/loss": 7.0}])
    # Resumed from the checkpoint of step 5: steps 5.. are trained (and logged) again.
    write_metrics(tmp_path, 1, [{"step": s, "train/loss": 5.0, "train/grad_norm": 0.5} for s in range(5, 12)]
                  + [{"step": 9, "val/loss": 6.0}])
    write_metrics(tmp_path, 10, [{"step": 12, "train/loss": 4.0}])  # versions sort as numbers
    series = run_series(tmp_path)
    assert series["train"] == [(s, 9.0) for s in range(5)] + [(s, 5.0) for s in range(5, 12)] + [(12, 4.0)]
    assert series["val"] == [(4, 8.0), (9, 6.0)]
    assert series["lr"] == [(s, 1e-3) for s in range(5)]
    assert series["grad_norm"] == [(s, 0.5) for s in range(5, 12)]


def test_curves_are_drawn_into_the_logs_folder(tmp_path):
    assert write_curves(tmp_path) is None  # nothing logged, nothing drawn
    write_metrics(tmp_path, 0, [{"step": s, "train/loss": 9.0 - s, "train/lr": 1e-3, "train/grad_norm": 1.0}
                                for s in range(20)] + [{"step": 19, "val/loss": 2.0}])
    path = write_curves(tmp_path)
    assert path == tmp_path / "logs" / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
