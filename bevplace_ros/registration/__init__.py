"""LiDAR registration from any yaw (KISS-Matcher on per-keyframe FPFH, or the RoITr-lite network) with GICP refinement, covariance and verification."""

from bevplace_ros.registration.errors import (
           RegistrationCheckpointError,
           RegistrationInputError,
)
from bevplace_ros.registration.registrar import (
           Registrar,
           RegistrationConfig,
           RegistrationResult,
)

__all__ = [
           "Registrar",
           "RegistrationCheckpointError",
           "RegistrationConfig",
           "RegistrationInputError",
           "RegistrationResult",
]
