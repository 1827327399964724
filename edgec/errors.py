"""Typed errors: UserError (bad input → exit 2) vs everything else (internal → exit 1)."""

from __future__ import annotations

__all__ = ["EdgecError", "UserError", "VerificationError", "TargetUnavailableError"]


class EdgecError(Exception):
    """Base class of edgec's own errors."""


class UserError(EdgecError):
    """The input was wrong (path, option, model, unsupported op); message says what to do."""


class VerificationError(UserError):
    """A numerical check failed: which output, by how much, against which tolerance."""


class TargetUnavailableError(UserError):
    """The target's runtime is not installed or cannot run on this machine."""
