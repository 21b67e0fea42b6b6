"""Managed-job statuses, named as SkyPilot names them."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    FAILED_SETUP = "FAILED_SETUP"
    FAILED_PRECHECKS = "FAILED_PRECHECKS"
    FAILED_NO_RESOURCE = "FAILED_NO_RESOURCE"
    FAILED_CONTROLLER = "FAILED_CONTROLLER"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def failed(self) -> bool:
        return self.value.startswith("FAILED")


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.FAILED_SETUP,
                      JobStatus.FAILED_PRECHECKS, JobStatus.FAILED_NO_RESOURCE, JobStatus.FAILED_CONTROLLER})
ACTIVE = frozenset(set(JobStatus) - TERMINAL)


class Phase(StrEnum):
    """Where an attempt is in its life."""

    PROVISIONING = "PROVISIONING"
    SYNCING = "SYNCING"
    SETTING_UP = "SETTING_UP"
    RUNNING = "RUNNING"
    TEARDOWN = "TEARDOWN"
    DONE = "DONE"
