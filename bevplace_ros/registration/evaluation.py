"""Registration benchmark protocol: methods, per-pair records and the KITTI-style summary metrics.

Success is RTE < 2 m and RRE < 5 deg (the KITTI-odometry registration protocol of 3DFeat-Net /
Predator / GeoTransformer); loops additionally report the strict RTE <= 0.2 m, RRE <= 1 deg rate.
Loop verification counts true loops accepted (recall) against hard false candidates accepted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bevplace_ros.registration.preprocess import PreparedCloud
from bevplace_ros.registration.refine import RefineConfig, gicp_refine
from bevplace_ros.se3 import (
    matrix_to_xyyaw,
    rotation_error_deg,
    translation_error,
    xyyaw_to_matrix,
)

SUCCESS_RTE, SUCCESS_RRE = 2.0, 5.0
STRICT_RTE, STRICT_RRE = 0.2, 1.0


@dataclass(frozen=True)
class Outcome:
    """What one method produced on one pair; `score` is the value thresholded for verification."""

    transform: np.ndarray
    score: float
    inlier_ratio: float
    ms: float
    degeneracy: float = float("nan")  # RegistrationResult.degeneracy; nan where the method has no such figure
    fitness: float = float("nan")  # the fitness whether or not verification passed


Method = Callable[[PreparedCloud, PreparedCloud, np.ndarray], Outcome]


def yaw_only(T: np.ndarray) -> np.ndarray:
    """The true yaw with no translation: the guess a caller without a BEV guess could still hope for."""
    return xyyaw_to_matrix(0.0, 0.0, matrix_to_xyyaw(T)[2])


def registrar_method(registrar) -> Method:
    """The registrar from no guess on cached per-cloud features (not timed, as in the node's verifier); its score is
    the fitness, or 0 when its own verification rejects."""
    def run(src: PreparedCloud, tgt: PreparedCloud, _truth: np.ndarray) -> Outcome:
        res = registrar.register_prepared(registrar.featurize(src), registrar.featurize(tgt))
        return Outcome(res.transform, res.fitness if res.verified else 0.0, res.inlier_ratio, res.timings["total"],
                       res.degeneracy, res.fitness)
    return run


def gicp_method(guess: Callable[[np.ndarray], np.ndarray], cfg: RefineConfig) -> Method:
    """small_gicp alone from a guess derived from the truth (identity, true yaw, ...)."""
    def run(src: PreparedCloud, tgt: PreparedCloud, truth: np.ndarray) -> Outcome:
        start = time.perf_counter()
        out = gicp_refine(src, tgt, guess(truth), cfg)
        return Outcome(out.transform, out.fitness, float("nan"), (time.perf_counter() - start) * 1e3, fitness=out.fitness)
    return run


def record(kind: str, truth: np.ndarray, outcome: Outcome) -> dict:
    rte, rre = translation_error(outcome.transform, truth), rotation_error_deg(outcome.transform, truth)
    return {"kind": kind, "rte": rte, "rre": rre, "score": outcome.score, "inlier_ratio": outcome.inlier_ratio,
            "ms": outcome.ms, "degeneracy": outcome.degeneracy, "fitness": outcome.fitness, "success": bool(rte < SUCCESS_RTE and rre < SUCCESS_RRE),
            "strict": bool(rte <= STRICT_RTE and rre <= STRICT_RRE)}


def summarise(records: list[dict], threshold: float) -> dict:
    """Per pair kind: RR, strict RR, mean RTE/RRE over successes, inlier ratio, ms; plus loop P/R."""
    out: dict = {"threshold": threshold}
    for kind in sorted({r["kind"] for r in records} - {"false"}):
        rows = [r for r in records if r["kind"] == kind]
        ok = [r for r in rows if r["success"]]
        out[kind] = {
            "pairs": len(rows), "rr": len(ok) / len(rows), "rr_strict": float(np.mean([r["strict"] for r in rows])),
            "rte_mean": float(np.mean([r["rte"] for r in ok])) if ok else float("nan"),
            "rre_mean": float(np.mean([r["rre"] for r in ok])) if ok else float("nan"),
            "inlier_ratio": float(np.nanmean([r["inlier_ratio"] for r in rows])) if any(
                np.isfinite(r["inlier_ratio"]) for r in rows) else float("nan"),
            "ms": float(np.mean([r["ms"] for r in rows])),
            "ms_median": float(np.median([r["ms"] for r in rows])),
            # how close right poses come to verification.max_degeneracy (the cap is set from the validation worlds')
            "degeneracy_max_success": max((r["degeneracy"] for r in ok if np.isfinite(r["degeneracy"])), default=float("nan")),
        }
    loops = [r for r in records if r["kind"] == "loop"]
    false = [r for r in records if r["kind"] == "false"]
    accepted_true = sum(r["score"] >= threshold and r["success"] for r in loops)
    accepted_false = sum(r["score"] >= threshold for r in false)
    accepted_wrong = sum(r["score"] >= threshold and not r["success"] for r in loops)
    accepted = accepted_true + accepted_false + accepted_wrong
    out["verification"] = {
        "precision": accepted_true / accepted if accepted else float("nan"),
        "recall": accepted_true / len(loops) if loops else float("nan"),
        "accepted_false_candidates": accepted_false, "accepted_wrong_poses": accepted_wrong,
        "loops": len(loops), "false_candidates": len(false),
    }
    return out
