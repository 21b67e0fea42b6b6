"""What the `set_mocks` tests share: run a Pulumi program in the test's mocked runtime and resolve its exports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pulumi


def run_and_resolve(program: Callable[[], Any], exported: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
    """Run `program` (mocks already set) and resolve what it exported into `exported`: name -> (value, secret)."""
    resolved: dict[str, tuple[Any, bool]] = {}

    async def settle() -> None:
        for name, value in exported.items():
            out = pulumi.Output.from_input(value)
            resolved[name] = (await out.future(), await out.is_secret())

    @pulumi.runtime.test
    def body() -> Any:
        program()
        return settle()

    body()
    return resolved
