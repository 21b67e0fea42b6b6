"""Shared base, managed-job statuses, named as SkyPilot names them: the enums live with the state machine
(`state.machine`)."""

from state.machine import ACTIVE, TERMINAL, JobStatus, Phase

__all__ = ["ACTIVE", "TERMINAL", "JobStatus", "Phase"]
