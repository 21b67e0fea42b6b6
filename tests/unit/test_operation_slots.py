"""Issue 26: stack operations at once are bounded by the cores and by the memory, not by the jobs waiting."""

from __future__ import annotations

import os

import pytest

from orchestrator.config import OPERATION_MIB, PulumiConfig


def _machine(monkeypatch: pytest.MonkeyPatch, cpus: int, memory_mib: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": memory_mib * 2**20 // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])


@pytest.mark.parametrize(("cpus", "memory_mib", "slots"), [
    (2, 24 * 1024, 2),  # this machine: the cores decide
    (64, 256 * 1024, 8),  # at most 8 by default
    (16, 4 * OPERATION_MIB * 3, 3),  # little memory: a quarter of it at ~OPERATION_MIB each
    (4, 512, 1),  # never none
])
def test_default_slots_follow_cores_and_memory(monkeypatch: pytest.MonkeyPatch, cpus: int, memory_mib: int,
                                               slots: int) -> None:
    _machine(monkeypatch, cpus, memory_mib)
    assert PulumiConfig().operation_slots == slots
    assert PulumiConfig(max_concurrent_operations=12).operation_slots == 12  # a setting wins
