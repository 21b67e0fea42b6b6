"""Shared base, errors a user may see. Each carries one line that names the thing and what to do.

They are plain exceptions with string arguments, so they cross process boundaries (stack operations
run in worker processes) by pickling unchanged.
"""

from __future__ import annotations


class SortieError(Exception):
    """An error with a one-line message meant for the user; the CLI prints it and exits non-zero."""

    exit_code = 1


class UsageError(SortieError):
    """Bad input from the user (a wrong field, an unknown name)."""

    exit_code = 2


class EngineError(SortieError):
    """The Pulumi engine is missing, the wrong version, or could not be built."""


class StackOperationError(SortieError):
    """A stack operation failed. `log_path` holds the engine's whole output. `cleanup_failed`: a failed `up`
    could not destroy what it had made, so the stack is left for the janitor."""

    def __init__(self, message: str, stack: str = "", log_path: str = "", cleanup_failed: bool = False) -> None:
        super().__init__(message, stack, log_path, cleanup_failed)
        self.message = message
        self.stack = stack
        self.log_path = log_path
        self.cleanup_failed = cleanup_failed

    def __str__(self) -> str:
        tail = f" (engine log: {self.log_path})" if self.log_path else ""
        return f"{self.message}{tail}"


class NoCapacityError(StackOperationError):
    """The infra had no capacity for a node (a cloud's capacity error, or a full local region)."""


class PolicyViolationError(StackOperationError):
    """A mandatory policy of a configured policy pack refused the stack (`pulumi.policy_packs`)."""


class InfraUnfitError(StackOperationError):
    """The infra cannot do what the stack asks (a Kubernetes cluster that gives a LoadBalancer Service no address):
    retrying there cannot help, so the launch fails with the reason (FAILED_PRECHECKS)."""


class StackLockedError(StackOperationError):
    """Another operation holds the stack's lock, and retrying did not get it."""


class StackNotFoundError(StackOperationError):
    """The backend has no stack of that name."""
