"""Every status write is `state.apply`'s (issue 27): no other module of the product updates a status column.

Read from the source (so a path no test runs is checked too): in every module outside `state/apply.py` and the
migrations, none of these may write a row's `status` (`phase` for an attempt):
- `update(...).values(status=...)`, or `.values(**d)` where the function put a status into `d` or `d` is its own
  `**kwargs` (a pass-through that may carry one);
- `row.status = ...`;
- a row made with a status (`JobRow(status=...)`) that is not handed to `state.apply.create`;
- SQL text that updates a status."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "state", "cli", "stacks", "bench")
ALLOWED = {"state/apply.py"}
STATUS = {"status", "phase"}
ROWS = {"JobRow", "TaskRow", "AttemptRow", "StackRow", "WorkerRow", "PoolRow"}
SQL = re.compile(r"(?is)\bupdate\s+\"?(jobs|tasks|attempts|stacks|workers|pools)\"?\s+set\b.*\b(status|phase)\b")


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _status_dicts(function: ast.AST) -> set[str]:
    """Names of dicts this function puts a status into."""
    found: set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            for target in targets:
                if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant) \
                        and target.slice.value in STATUS and isinstance(target.value, ast.Name):
                    found.add(target.value.id)
                if isinstance(target, ast.Name) and value is not None and (
                        (isinstance(value, ast.Dict) and any(isinstance(k, ast.Constant) and k.value in STATUS
                                                             for k in value.keys))
                        or (isinstance(value, ast.Call) and _name(value.func) == "dict"
                            and any(k.arg in STATUS for k in value.keywords))):
                    found.add(target.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" \
                and isinstance(node.func.value, ast.Name) and any(k.arg in STATUS for k in node.keywords):
            found.add(node.func.value.id)
    return found


def offences(source: str) -> list[str]:
    """What in `source` writes a status outside `state.apply`, one line each."""
    tree = ast.parse(source)
    bad: list[str] = []
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)] or [tree]
    for function in [tree, *functions]:
        dicts = _status_dicts(function) if function is not tree else set()
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef) and function.args.kwarg is not None:
            dicts.add(function.args.kwarg.arg)  # `**values` passed on: it may carry a status
        created = {a.id for n in ast.walk(function) if isinstance(n, ast.Call) and _name(n.func) == "create"
                   for a in n.args if isinstance(a, ast.Name)}
        created_inline = {id(a) for n in ast.walk(function) if isinstance(n, ast.Call) and _name(n.func) == "create"
                          for a in n.args}
        assigned = {id(n.value): n.targets[0].id for n in ast.walk(function)
                    if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)}
        for node in ast.walk(function):
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.Call) and _name(node.func) == "values":
                if any(k.arg in STATUS for k in node.keywords):
                    bad.append(f"{line}: .values(status=...)")
                if any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id in dicts
                       for k in node.keywords):
                    bad.append(f"{line}: .values(**a dict with a status)")
            if isinstance(node, ast.Call) and _name(node.func) in ROWS \
                    and any(k.arg in STATUS for k in node.keywords) \
                    and id(node) not in created_inline and assigned.get(id(node)) not in created:
                bad.append(f"{line}: {_name(node.func)}(<a status>=...) not given to state.apply.create")
            if isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                flat = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
                for target in flat:
                    if isinstance(target, ast.Attribute) and target.attr in STATUS \
                            and not (isinstance(target.value, ast.Name) and target.value.id == "self"):
                        bad.append(f"{line}: .{target.attr} = ...")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
                bad.append(f"{line}: SQL that updates a status")
    return sorted(set(bad))


def test_no_module_but_state_apply_writes_a_status() -> None:
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in ALLOWED or rel.startswith("state/migrations/"):
                continue
            hits = offences(path.read_text())
            if hits:
                found[rel] = hits
    assert found == {}, f"status writes outside state/apply.py (use state.apply.apply / create): {found}"


def test_the_check_finds_each_kind_of_status_write() -> None:
    """The checker itself: each way around `state.apply` is caught, and what `state.apply` does is not."""
    assert offences("session.execute(update(JobRow).where(JobRow.id == 1).values(status='RUNNING'))")
    assert offences("def f():\n    v = {'updated_at': 1}\n    v['status'] = 'X'\n"
                    "    session.execute(update(JobRow).values(**v))\n")
    assert offences("def f():\n    v: dict = {}\n    v.update(phase='DONE')\n"
                    "    s.execute(update(AttemptRow).values(**v))\n")
    assert offences("def f(row):\n    row.status, row.destroyed_at = 'CREATING', None\n")
    assert offences("def f(session):\n    session.add(StackRow(name='s', status='UP'))\n")
    assert offences("session.execute(text('UPDATE jobs SET status = :s WHERE id = :i'))")
    assert offences("def guarded(session, model, **values):\n    session.execute(update(model).values(**values))\n")
    assert not offences("def f(session):\n    create(session, 'submit', JobRow(status='PENDING'))\n")
    assert not offences("def f(session):\n    row = TaskRow(status='PENDING')\n    create(session, 'submit', row)\n")
    assert not offences("class A:\n    def __init__(self, status):\n        self.status = status\n")
    assert not offences("def f(session):\n    apply(session, 't', 'job', [], to='RUNNING', updated_at=1)\n")
