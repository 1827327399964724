"""Typed errors: UserError (bad input → exit 2) vs everything else (internal → exit 1)."""

from __future__ import annotations

__all__ = ["EdgecError", "InternalError", "TargetUnavailableError", "UserError",
           "VerificationError"]


class EdgecError(Exception):
    """Base class of edgec's own errors."""


class UserError(EdgecError):
    """The input was wrong (path, option, model, unsupported op); message says what to do."""


class VerificationError(UserError):
    """A numerical check failed: which output, by how much, against which tolerance."""


class TargetUnavailableError(UserError):
    """The target's runtime is not installed or cannot run on this machine."""


class InternalError(EdgecError):
    """edgec or a library it drives failed (not the input's fault): exit 1, a bug to report.

    The message names the stage that failed; the library's exception is chained as the cause.
    """
