"""PNG figures of a place-recognition evaluation: PR curves per method and revisit direction, and
the trajectory coloured by what loop detection did at its F1max threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bevplace_ros.atomic_io import atomic_write
from bevplace_ros.evaluation.place_metrics import LoopMatches, PRCurve

_STYLE = {"same": "-", "reverse": "--"}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_pr_curves(curves: dict[str, dict[str, PRCurve]], title: str, path: Path) -> Path:
    """curves[method][direction]; splits without revisits are left out of the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for color, (method, by_direction) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], curves.items()):
        for direction, curve in by_direction.items():
            if curve.f1_max is None:
                continue
            ax.plot(curve.recall, curve.precision, _STYLE[direction], color=color, label=f"{method} {direction} (F1max {curve.f1_max:.3f}, n={curve.revisits})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_detections(positions: np.ndarray, matches: LoopMatches, correct: np.ndarray, revisit: np.ndarray, threshold: float | None, title: str, path: Path) -> Path:
    """Grey path; green correct detection, red wrong detection, orange missed revisit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detected = matches.distance <= threshold if threshold is not None else np.zeros(len(positions), dtype=bool)
    groups = {
        "correct": (detected & correct, "tab:green"),
        "wrong": (detected & ~correct, "tab:red"),
        "missed": (revisit & ~(detected & correct), "tab:orange"),
    }
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot(positions[:, 0], positions[:, 1], color="0.75", lw=1, zorder=1)
    for name, (mask, color) in groups.items():
        ax.scatter(positions[mask, 0], positions[mask, 1], s=6, color=color, label=f"{name} ({int(mask.sum())})", zorder=2)
    shown = "none" if threshold is None else f"{threshold:.3f}"
    ax.set(xlabel="x [m]", ylabel="y [m]", title=f"{title}\nthreshold {shown}")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
