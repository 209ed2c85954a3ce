"""Accept/reject a registration, and calibrate the acceptance threshold for a target precision."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VerificationConfig:
    """A loop is accepted only if the aligned clouds overlap enough and enough matches agree.

    `min_fitness` defaults to the value calibrated by `bevplace-ros evaluate registration` on held-out
    validation pairs (see docs/registration.md); the others are sanity floors.
    """

    # share of source points with a target point within fine_distance: the highest threshold calibrated for a
    # classical method over runs (0.41-0.505), because the demo world showed an earlier KISS-Matcher path's 0.477
    # admitting a 0.7 m / 5.5 deg pose (docs/registration.md)
    min_fitness: float = 0.505
    min_inlier_ratio: float = 0.05
    min_inliers: int = 10
    # covariance.degeneracy: how many times less the alignment pins its weakest direction than each scan does alone.
    # Twice the highest right pose of the validation worlds (6.5; the stress test's bare corridor 5.3, KITTI pairs 3.6);
    # poses that slid along a street mostly 10-120, the held-out world's accepted false candidate 32 (docs/registration.md)
    max_degeneracy: float = 13.0

    def __post_init__(self) -> None:
        for name in ("min_fitness", "min_inlier_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_inliers < 0:
            raise ValueError(f"min_inliers must be >= 0, got {self.min_inliers}")
        if not self.max_degeneracy >= 1.0:
            raise ValueError(f"max_degeneracy must be >= 1 (a ratio of information shares), got {self.max_degeneracy}")


def verify(fitness: float, inlier_ratio: float, num_inliers: int, degeneracy: tuple[float, np.ndarray],
           cfg: VerificationConfig) -> tuple[bool, str]:
    """(accepted, reason); the reason names the first failed check, empty when accepted. `degeneracy`: the final
    alignment's `covariance.degeneracy` (ratio, weakest direction)."""
    if num_inliers < cfg.min_inliers:
        return False, f"only {num_inliers} inlier correspondences (< {cfg.min_inliers})"
    if inlier_ratio < cfg.min_inlier_ratio:
        return False, f"inlier ratio {inlier_ratio:.3f} < {cfg.min_inlier_ratio}"
    if fitness < cfg.min_fitness:
        return False, f"fitness {fitness:.3f} < {cfg.min_fitness}"
    ratio, weakest = degeneracy
    if ratio > cfg.max_degeneracy:
        x, y, z = weakest
        return False, (f"degenerate: along ({x:+.2f}, {y:+.2f}, {z:+.2f}) (query frame) the alignment pins the translation "
                       f"{ratio:.0f}x less than each cloud does alone (> {cfg.max_degeneracy:g}): it can slide there")
    return True, ""


def calibrate_threshold(scores: np.ndarray, is_true: np.ndarray, precision: float = 1.0) -> float:
    """Lowest score threshold whose accepted set (score >= t) reaches `precision` on validation pairs."""
    scores, is_true = np.asarray(scores, float), np.asarray(is_true, bool)
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision must be in (0, 1], got {precision}")
    order = np.argsort(-scores)
    ranked = scores[order]
    precision_at = np.cumsum(is_true[order]) / np.arange(1, len(scores) + 1)
    separable = np.append(ranked[:-1] > ranked[1:], True)  # a cut inside a run of ties is not realisable
    ok = np.nonzero((precision_at >= precision) & separable)[0]
    if len(ok) == 0:
        return float(np.nextafter(ranked[0], np.inf))  # nothing can be accepted at this precision
    return float(ranked[ok[-1]])
