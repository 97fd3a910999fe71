"""A run's curves, drawn from its CSV logs: what people would rather look at than read.

``scratchlm fit`` writes ``<run dir>/logs/curves.png`` when training ends: training and held-out
loss, and the learning rate with the gradients' norm, by optimizer step. A resumed run logs each
start into its own ``logs/version_N/metrics.csv``; the curves join them, a later start's rows
replacing an earlier one's for the steps both logged (a run resumed from a checkpoint before its
last logged step retrains those steps).

Drawn on ``matplotlib.figure.Figure`` directly, without ``pyplot``: no display or global state.
"""

import csv
from pathlib import Path

SERIES = {"train": "train/loss", "val": "val/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"}
"""Curve name -> the metric column it comes from."""


def run_series(root: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of each curve in ``SERIES``, over every start of the run at ``root``."""
    points: dict[str, dict[int, float]] = {name: {} for name in SERIES}
    for path in sorted((root / "logs").glob("version_*/metrics.csv"), key=version_number):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        steps = {int(row["step"]) for row in rows if row.get("step")}
        for name, column in SERIES.items():
            if steps:  # this start trained these steps again: its values replace the earlier ones
                points[name] = {s: v for s, v in points[name].items() if s < min(steps)}
            for row in rows:
                if row.get(column) and row.get("step"):
                    points[name][int(row["step"])] = float(row[column])
    return {name: sorted(values.items()) for name, values in points.items()}


def version_number(path: Path) -> int:
    return int(path.parent.name.removeprefix("version_"))


def write_curves(root: Path) -> Path | None:
    """Draw ``<root>/logs/curves.png`` from the run's logs; None when nothing was logged."""
    series = run_series(root)
    if not series["train"] and not series["val"]:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 6.4), layout="constrained")
    loss_axes, optim_axes = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for name, style in (("train", {"alpha": 0.7, "linewidth": 1}), ("val", {"marker": "o", "markersize": 4})):
        if series[name]:
            steps, values = zip(*series[name])
            loss_axes.plot(steps, values, label=f"{name} loss", **style)
    loss_axes.set_ylabel("loss (nats)")
    loss_axes.set_title(f"{root.resolve().name}: loss by step")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    if series["lr"]:
        optim_axes.plot(*zip(*series["lr"]), color="C2", label="learning rate")
        optim_axes.set_ylabel("learning rate")
    if series["grad_norm"]:
        norm_axes = optim_axes.twinx()
        norm_axes.plot(*zip(*series["grad_norm"]), color="C3", alpha=0.6, linewidth=1, label="gradient norm")
        norm_axes.set_ylabel("gradient norm (before clipping)")
        norm_axes.set_yscale("log")
    optim_axes.set_xlabel("optimizer step")
    optim_axes.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=2, handles=optim_lines(figure))
    path = root / "logs" / "curves.png"
    figure.savefig(path, dpi=100)
    return path


def optim_lines(figure) -> list:
    """The learning-rate and gradient-norm lines, for one legend across their two y axes."""
    return [line for axes in figure.axes[1:] for line in axes.get_lines()]
