"""Issue 26's lean stack, the parts that need no engine: outputs from a `stack export`, and the file backend's tags
file (its path only where the stack's state is, a merge, the engine's format)."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.infra._lean_stack import (
    SECRET_SIG,
    _output_value,
    file_backend_tags_path,
    write_file_backend_tags,
)


def test_a_secret_output_keeps_its_value_and_is_marked() -> None:
    secret = _output_value({SECRET_SIG: "1b47061264138c4ac30d75fd1eb44270", "plaintext": json.dumps("t0k3n")})
    assert (secret.value, secret.secret) == ("t0k3n", True)
    nested = _output_value({SECRET_SIG: "1b47061264138c4ac30d75fd1eb44270", "plaintext": json.dumps({"a": [1]})})
    assert nested.value == {"a": [1]} and nested.secret
    plain = _output_value([{"rank": 0, "ip": "127.0.0.1"}])
    assert (plain.value, plain.secret) == ([{"rank": 0, "ip": "127.0.0.1"}], False)


def test_tags_go_beside_the_stacks_state_on_a_file_backend_only(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    assert file_backend_tags_path(url, "sortie", "s1") is None  # no state yet: the engine's layout is not assumed
    stacks = tmp_path / ".pulumi" / "stacks" / "sortie"
    stacks.mkdir(parents=True)
    (stacks / "s1.json").write_text("{}")
    assert file_backend_tags_path(url, "sortie", "s1") == stacks / "s1.pulumi-tags"
    assert file_backend_tags_path("postgres://u@h/db", "sortie", "s1") is None


def test_tags_are_merged_into_the_engines_format(tmp_path: Path) -> None:
    path = tmp_path / "s1.pulumi-tags"
    path.write_text(json.dumps({"version": 1, "tags": {"pulumi:project": "sortie", "team": "old"}}))
    write_file_backend_tags(path, {"team": "ml", "sortie:owner": "sortie"})
    assert json.loads(path.read_text()) == {"version": 1, "tags": {"pulumi:project": "sortie", "team": "ml",
                                                                   "sortie:owner": "sortie"}}
    assert [p.name for p in tmp_path.iterdir()] == ["s1.pulumi-tags"]  # no temporary file left
