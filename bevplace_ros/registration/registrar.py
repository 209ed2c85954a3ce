"""The registration entry point: prepared clouds in, 6-DoF pose + covariance + accept/reject out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from bevplace_ros.registration.checkpoint import DEFAULT_WEIGHTS
from bevplace_ros.registration.covariance import (
    covariance_from_hessian,
    degeneracy,
    point_to_point_hessian,
    to_ros_order,
)
from bevplace_ros.registration.errors import RegistrationInputError
from bevplace_ros.registration.fpfh import FpfhConfig
from bevplace_ros.registration.kiss import KissConfig
from bevplace_ros.registration.matching import Correspondences, MatchingConfig
from bevplace_ros.registration.pose_estimation import PoseConfig, PoseEstimate
from bevplace_ros.registration.preprocess import (
    PreparedCloud,
    PreprocessConfig,
    prepare_cloud,
)
from bevplace_ros.registration.refine import RefineConfig, coarse_source, gicp_refine, self_hessian
from bevplace_ros.registration.verification import VerificationConfig, verify


# The default second try: looser matching (each among the other's 3 most similar) and a second pose on the matches
# the first leaves unexplained. Validation worlds (urban/suburban 1, 2, 3, 50; never the held-out one), 10-14 m
# pairs: 61 -> 74 of 90 registered, 0 of 120 false candidates accepted; the repeated corridor keeps its revisits
# (mutual-3 as the first try flipped one). See docs/registration.md
WIDER_RETRY = KissConfig(mutual_k=3, hypotheses=2)
# Denser keypoints (0.75 m voxels, radii scaled with them), the ground's left out: on the validation worlds 10-14 m
# pairs 66 -> 90 of 100 registered and none of 100 false candidates accepted, but on the held-out world it found and
# accepted one false candidate (fitness 0.547) for 10-14 m RR 0.900 -> 0.925, so it is only an option (docs/registration.md)
DENSE_RETRY = KissConfig(voxel=0.75, fpfh=FpfhConfig(2.25, 3.75), max_normal_z=0.9)
KISS_RETRIES: dict[str, KissConfig | None] = {"wider": WIDER_RETRY, "dense": DENSE_RETRY, "none": None}  # by name
CLASSICAL_METHODS = ("kiss_matcher",)  # the hand-written FPFH + RANSAC lost to it on every figure (docs/registration.md)
METHODS = ("network", *CLASSICAL_METHODS)


def method_options(method: str) -> dict:
    """RegistrationConfig fields that select `method` (one of METHODS); the network falls back to the default classical."""
    if method not in METHODS:
        raise ValueError(f"registration method must be one of {METHODS}, got {method!r}")
    return {"use_network": method == "network", **({} if method == "network" else {"classical": method})}


@dataclass(frozen=True)
class RegistrationConfig:
    """Everything the registrar needs; each stage keeps its own validated config."""

    weights: str = str(DEFAULT_WEIGHTS)
    device: str = "auto"
    # KISS-Matcher leads the held-out and real-pair figures (docs/registration.md); the network trails.
    use_network: bool = False  # True: the RoITr-lite matcher (with classical_fallback); False: `classical` alone
    classical: str = "kiss_matcher"  # one of CLASSICAL_METHODS: the classical path, alone or as the network's fallback
    classical_fallback: bool = True  # retry a network result that fails verification with `classical`
    torch_threads: int = 1  # CPU threads for torch; 1 avoids OpenMP spinning on a shared 2-core box
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    kiss: KissConfig = field(default_factory=KissConfig)
    # a second KISS-Matcher try when the first fails verification (WIDER_RETRY, or e.g. DENSE_RETRY); None: one try
    kiss_retry: KissConfig | None = WIDER_RETRY
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    pose: PoseConfig = field(default_factory=PoseConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)

    def __post_init__(self) -> None:
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.classical not in CLASSICAL_METHODS:
            raise ValueError(f"classical must be one of {CLASSICAL_METHODS}, got {self.classical!r}")

    @property
    def method(self) -> str:
        """The primary method's name, one of METHODS."""
        return "network" if self.use_network else self.classical


@dataclass(frozen=True)
class RegistrationResult:
    """All a caller needs to accept a loop: pose, its uncertainty, quality scores and the decision."""

    transform: np.ndarray  # (4, 4) T_target_source
    covariance: np.ndarray  # (6, 6) rot x,y,z then trans x,y,z (see covariance.py)
    fitness: float
    inlier_ratio: float
    num_correspondences: int
    verified: bool
    reason: str
    timings: dict[str, float]
    degeneracy: float = float("nan")  # covariance.degeneracy of the pose (verification.max_degeneracy); nan: no pose

    def covariance_ros(self) -> np.ndarray:
        """Covariance in geometry_msgs/PoseWithCovariance order (x, y, z, roll, pitch, yaw)."""
        return to_ros_order(self.covariance)


def rejected(reason: str, timings: dict[str, float] | None = None, num_correspondences: int = 0) -> RegistrationResult:
    """The defined answer to a pair that cannot be registered: identity, a vague covariance, not verified."""
    return RegistrationResult(transform=np.eye(4), covariance=np.eye(6) * 1e4, fitness=0.0, inlier_ratio=0.0,
                              num_correspondences=num_correspondences, verified=False, reason=reason,
                              timings=timings if timings is not None else {"total": 0.0})


def same_cloud(src: PreparedCloud, tgt: PreparedCloud) -> bool:
    """Identical inputs: no global search is needed (KISS-Matcher's pruning is slowest when every match agrees).

    small_gicp's threaded voxelisation does not keep point order, so the clouds are compared sorted."""
    return src is tgt or (src.gicp_points.shape == tgt.gicp_points.shape
                          and np.array_equal(np.sort(src.gicp_points, axis=0), np.sort(tgt.gicp_points, axis=0)))


def _check_guess(guess: np.ndarray | None) -> np.ndarray | None:
    if guess is None:
        return None
    arr = np.asarray(guess, dtype=np.float64)
    if arr.shape != (4, 4) or not np.isfinite(arr).all():
        raise RegistrationInputError(f"initial_guess must be a finite 4x4 matrix, got shape {arr.shape}")
    if not np.allclose(arr[:3, :3] @ arr[:3, :3].T, np.eye(3), atol=1e-4) or not np.allclose(arr[3], [0, 0, 0, 1]):
        raise RegistrationInputError("initial_guess is not a rigid transform (rotation not orthonormal or bad last row)")
    return arr


class Registrar:
    """Registers LiDAR clouds from any initial yaw; keep `preprocess` results to register keyframes cheaply."""

    def __init__(self, cfg: RegistrationConfig | None = None) -> None:
        import torch

        from bevplace_ros.device import resolve_device

        self.cfg = cfg or RegistrationConfig()
        self.device = resolve_device(self.cfg.device)
        torch.set_num_threads(self.cfg.torch_threads)
        self.model = None
        self.meta: dict = {}
        if self.cfg.use_network:
            from bevplace_ros.registration.checkpoint import load_model

            self.model, self.meta = load_model(self.cfg.weights, self.device)

    def preprocess(self, points: np.ndarray, name: str = "points") -> PreparedCloud:
        """Voxelise, estimate normals, pick superpoints, then `featurize`; the result is cacheable."""
        return self.featurize(prepare_cloud(points, self.cfg.preprocess, name))

    def featurize(self, cloud: PreparedCloud) -> PreparedCloud:
        """Add what this registrar's method needs per cloud (network encoding or FPFH, GICP's sparse source), once:
        a cloud prepared by another registrar gets only what it lacks, so pairs are timed on cached features."""
        import torch

        start = time.perf_counter()
        if self.model is not None:
            from bevplace_ros.registration.model import encode_arrays

            if "encoded" not in cloud.features:
                with torch.inference_mode():
                    cloud.features["encoded"] = encode_arrays(self.model, cloud.arrays(), self.device)
        else:
            self._classical_features(cloud)
        if self.cfg.refine.enabled:
            coarse_source(cloud, self.cfg.refine)
        self_hessian(cloud, self.cfg.refine)
        cloud.timings["features"] = cloud.timings.get("features", 0.0) + (time.perf_counter() - start) * 1e3
        return cloud

    def register(self, source: np.ndarray, target: np.ndarray, initial_guess: np.ndarray | None = None
                 ) -> RegistrationResult:
        """T_target_source for raw clouds (N, >=3); `initial_guess` is an optional prior, not required."""
        guess = _check_guess(initial_guess)
        src = self.preprocess(source, "source")
        tgt = src if np.array_equal(source, target) else self.preprocess(target, "target")
        result = self.register_prepared(src, tgt, guess)
        prep = {"preprocess": sum(src.timings.values()) + (sum(tgt.timings.values()) if tgt is not src else 0.0)}
        timings = {**prep, **result.timings, "total": result.timings["total"] + prep["preprocess"]}
        return RegistrationResult(**{**result.__dict__, "timings": timings})

    def register_prepared(self, src: PreparedCloud, tgt: PreparedCloud, initial_guess: np.ndarray | None = None
                          ) -> RegistrationResult:
        """Correspondences -> robust pose -> GICP -> covariance -> verification, on cached clouds; further poses
        (`_attempts`, KissConfig.hypotheses) are tried until one passes, keeping the passing or best-fitting result.

        Timings: the first pose's stages, then the totals of later poses of the same try ("hypotheses") and of
        later tries ("fallback" after the network, "retry" for `kiss_retry`)."""
        guess = _check_guess(initial_guess)
        start = time.perf_counter()
        result, timings = None, {}
        for kiss in self._attempts():  # KISS-Matcher fetches its cached features itself (computed on a cache miss)
            for n, out in enumerate(self._attempt(src, tgt, guess, kiss)):
                if result is None:
                    result, timings = out, dict(out.timings)
                else:
                    key = "hypotheses" if n else "fallback" if kiss is self.cfg.kiss else "retry"
                    timings[key] = timings.get(key, 0.0) + out.timings["total"]
                    result = out if out.verified or out.fitness > result.fitness else result
                if result.verified:
                    break
            if result.verified:
                break
        timings["total"] = (time.perf_counter() - start) * 1e3
        return replace(result, timings=timings)

    def _attempts(self) -> list[KissConfig | None]:
        """The tries in order: None for the network, then KISS-Matcher and its retry (the network's fallback)."""
        classical = [self.cfg.kiss] + ([self.cfg.kiss_retry] if self.cfg.kiss_retry is not None else [])
        if self.model is None:
            return classical
        return [None] + (classical if self.cfg.classical_fallback else [])

    def _classical_features(self, cloud: PreparedCloud) -> None:
        """What KISS-Matcher needs from one cloud (keypoints + FPFH for each try's voxel), cached on it."""
        from bevplace_ros.registration.kiss import kiss_features

        for kiss in self._attempts():
            if kiss is not None:
                kiss_features(cloud, kiss)

    def _attempt(self, src: PreparedCloud, tgt: PreparedCloud, guess: np.ndarray | None, kiss: KissConfig | None
                 ) -> Iterator[RegistrationResult]:
        """One try's poses, each refined by GICP, given a covariance and verified: the network's (`kiss` None) or
        KISS-Matcher's hypotheses with `kiss`, lazily, so later ones cost only when the caller asks."""
        start = time.perf_counter()
        for estimate, matched, timings in self._estimates(src, tgt, guess, kiss):
            if estimate is None:
                yield self._failure("no usable correspondences", len(matched[0]), timings, start)
                return
            yield self._finish(src, tgt, estimate, matched, timings, start)
            start = time.perf_counter()

    def _finish(self, src: PreparedCloud, tgt: PreparedCloud, estimate: PoseEstimate,
                matched: tuple[np.ndarray, np.ndarray], timings: dict[str, float], start: float) -> RegistrationResult:
        """GICP from the estimate, the covariance and degeneracy of the result, and the accept/reject decision."""
        coarse = estimate.transform.cpu().numpy()
        inlier_ratio, num_inliers = estimate.inlier_ratio, int(estimate.inliers.sum())
        t0 = time.perf_counter()
        if self.cfg.refine.enabled:
            refined = gicp_refine(src, tgt, coarse, self.cfg.refine)
            transform, fitness, hessian = refined.transform, refined.fitness, refined.hessian
            covariance = covariance_from_hessian(hessian, refined.error, refined.num_inliers)
        else:  # no GICP: the correspondences themselves give the fitness and the Hessian
            transform, fitness = coarse, inlier_ratio
            inl = estimate.inliers.cpu().numpy()
            hessian, error = point_to_point_hessian(matched[0][inl], matched[1][inl], coarse)
            covariance = covariance_from_hessian(hessian, error, num_inliers)
        timings["refine"] = (time.perf_counter() - t0) * 1e3
        slide = degeneracy(hessian, self_hessian(src, self.cfg.refine), self_hessian(tgt, self.cfg.refine), transform[:3, :3])
        verified, reason = verify(fitness, inlier_ratio, num_inliers, slide, self.cfg.verification)
        timings["total"] = (time.perf_counter() - start) * 1e3
        return RegistrationResult(transform=transform, covariance=covariance, fitness=fitness,
                                  inlier_ratio=inlier_ratio, num_correspondences=len(matched[0]), verified=verified,
                                  reason=reason, timings=timings, degeneracy=slide[0])

    def _estimates(self, src: PreparedCloud, tgt: PreparedCloud, guess: np.ndarray | None, kiss: KissConfig | None
                   ) -> Iterator[tuple[PoseEstimate | None, tuple[np.ndarray, np.ndarray], dict[str, float]]]:
        """Robust poses (None: no usable matches) from network (LGR) or KISS-Matcher correspondences, with the
        matched points and each pose's match / pose timings."""
        import torch

        from bevplace_ros.registration import pose_estimation as pe

        if same_cloud(src, tgt):  # GICP from identity is exact and fast
            points = torch.as_tensor(src.fine_points, dtype=torch.float64)
            yield PoseEstimate(transform=torch.eye(4, dtype=torch.float64), inliers=torch.ones(len(points), dtype=torch.bool),
                               inlier_ratio=1.0, num_hypotheses=1), (src.fine_points, src.fine_points), {"match": 0.0, "pose": 0.0}
            return
        if kiss is not None:  # KISS-Matcher takes no prior: it has no hypothesis to add
            yield from self._kiss(src, tgt, kiss)
            return
        t0 = time.perf_counter()
        extra = None if guess is None else torch.as_tensor(guess, device=self.device)[None]  # prior = 1 hypothesis
        with torch.inference_mode():
            corr = self._network_correspondences(src, tgt)
            t1 = time.perf_counter()
            estimate = pe.local_to_global(corr, self.cfg.pose, extra)
        timings = {"match": (t1 - t0) * 1e3, "pose": (time.perf_counter() - t1) * 1e3}
        yield estimate, (corr.src.double().cpu().numpy(), corr.tgt.double().cpu().numpy()), timings

    def _kiss(self, src: PreparedCloud, tgt: PreparedCloud, kiss: KissConfig
              ) -> Iterator[tuple[PoseEstimate | None, tuple[np.ndarray, np.ndarray], dict[str, float]]]:
        """KISS-Matcher's poses as PoseEstimates with the inlier mask over its matches (for the no-GICP Hessian)."""
        import torch

        from bevplace_ros.registration.kiss import kiss_hypotheses

        for out in kiss_hypotheses(src, tgt, kiss):
            timings = {"match": out.match_ms, "pose": out.pose_ms}
            matched = (out.src_matched, out.tgt_matched)
            if not out.valid:
                yield None, matched, timings
                return
            yield PoseEstimate(transform=torch.as_tensor(out.transform), inliers=torch.as_tensor(out.inliers),
                               inlier_ratio=out.inlier_ratio, num_hypotheses=1), matched, timings

    def _network_correspondences(self, src: PreparedCloud, tgt: PreparedCloud) -> Correspondences:
        import torch

        from bevplace_ros.registration.matching import coarse_matches, fine_matches

        for cloud in (src, tgt):
            if "encoded" not in cloud.features:
                raise RegistrationInputError("prepared cloud lacks network features; prepare it with this Registrar")
        a, b = src.features["encoded"], tgt.features["encoded"]
        src_desc, tgt_desc = self.model.match(a, b)
        si, ti = coarse_matches(src_desc, tgt_desc, self.cfg.matching)
        arrays = (torch.as_tensor(x, device=self.device) for x in (src.patches, tgt.patches, src.fine_points,
                                                                     tgt.fine_points))
        return fine_matches(si, ti, *arrays, a.point_desc, b.point_desc, self.cfg.matching)

    def _failure(self, reason: str, num_corr: int, timings: dict[str, float], start: float) -> RegistrationResult:
        timings["total"] = (time.perf_counter() - start) * 1e3
        return rejected(reason, timings, num_corr)
