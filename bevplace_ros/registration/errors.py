"""Exceptions of the registration stage, so callers can tell bad input from bad weights."""

from __future__ import annotations


class RegistrationInputError(ValueError):
    """A point cloud or initial guess handed to the registrar is unusable (shape, NaN, too few points)."""


class RegistrationCheckpointError(RuntimeError):
    """The registration weights file is missing, unreadable or does not fit the model."""
