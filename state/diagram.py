"""The table of legal moves (`state.machine.TRANSITIONS`) drawn as Mermaid state diagrams, one per table, each edge
labelled with the transitions that make it. `docs/state-machine.md` is this module's output, and a test
(`tests/unit/test_state_diagram.py`) fails when it is not, so the picture cannot drift from the guard.

    .venv/bin/python -m state.diagram > docs/state-machine.md
"""

from __future__ import annotations

from state.machine import TERMINAL, TRANSITIONS

ENDED = "ENDED"  # drawn for "every terminal status alike": SUCCEEDED, CANCELLED and each FAILED_*

TABLES = (("job", "A managed job (SkyPilot's statuses)"), ("task", "A task of a job (the same names)"),
          ("attempt", "An attempt: one cluster of one task (its `phase`)"), ("stack", "A Pulumi stack"),
          ("pool", "A pool"), ("worker", "A pool's worker"))

HEADER = """# The state machine

Generated from `state/machine.py` by `python -m state.diagram` (do not edit: `tests/unit/test_state_diagram.py`
fails when this page is not the table's picture).

Every status write goes through `state.apply.apply` (a move) or `state.apply.create` (a new row). Each takes its
move from the table at run time: the rows it updates are only those in a status from which the named transition
may reach the new one (`UPDATE ... WHERE ... AND status IN (sources)`), and the lease and the event are checked and
written in the same transaction. `tests/unit/test_status_writes.py` fails if any other module writes a status.

## Adding a transition

1. Add its moves to `TRANSITIONS` in `state/machine.py` (`_moves(table, from, to)`; `None` as `from` is a new row).
2. Write its method in `state/transitions.py` (jobs, tasks, attempts, stacks) or `state/pool_transitions.py`
   (pools, workers): one `with self.session() as session, session.begin():` holding its `apply(session,
   "<name>", "<table>", [where], to=..., expect=..., job_lease=... or lease=...)` calls and its `event` (or
   `pool_event`); forward it on `StateStore` in `state/store.py` (`name = _via("job_transitions", J.name)`).
3. Regenerate this page: `.venv/bin/python -m state.diagram > docs/state-machine.md`.
4. `tests/unit/test_machine.py` runs the lifecycles and checks every move against the table; add the transition
   to a lifecycle of `tests/unit/test_crash_points.py` if it writes during a job's life.
"""


def edges(table: str) -> dict[tuple[str, str], list[str]]:
    """(from, to) -> the transitions that make that move; `[*]` for a new row."""
    found: dict[tuple[str, str], list[str]] = {}
    for name, moves in TRANSITIONS.items():
        for t, before, after in moves:
            if t == table:
                found.setdefault((before or "[*]", after), []).append(name)
    return found


def diagram(table: str) -> str:
    """The table's moves; a status's moves to every terminal status by the same transitions are one edge to
    ENDED, the others stay apart."""
    found = {key: ", ".join(sorted(names)) for key, names in edges(table).items()}
    terminal = sorted(TERMINAL)
    drawn: dict[tuple[str, str], str] = {}
    for (before, after), label in found.items():
        if after in TERMINAL and all(found.get((before, t)) == label for t in terminal):
            drawn[(before, ENDED)] = label
        else:
            drawn[(before, after)] = label
    lines = ["```mermaid", "stateDiagram-v2"]
    lines += [f"    {before} --> {after}: {label}" for (before, after), label in sorted(drawn.items())]
    if any(after == ENDED for _, after in drawn):
        lines.append(f"    note right of {ENDED}: any of {', '.join(terminal)}")
    lines.append("```")
    return "\n".join(lines)


def page() -> str:
    parts = [HEADER]
    for table, title in TABLES:
        parts.append(f"## {table}\n\n{title}.\n\n{diagram(table)}\n")
    flags = sorted(name for name, moves in TRANSITIONS.items() if not moves)
    parts.append("## Transitions that move no status\n\n" + ", ".join(f"`{n}`" for n in flags)
                 + ": a flag, a count or a time, written under the same guards.\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(page(), end="")
