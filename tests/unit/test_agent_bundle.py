"""The node agent's zipapp (orchestrator/infra/agent_bundle.py): standard library only, complete, deterministic,
and small enough for EC2's user data; and the local provider's pickle, which names no moved module."""

from __future__ import annotations

import ast
import base64
import gzip
import io
import subprocess
import sys
import zipfile
from pathlib import Path

from orchestrator.infra import agent_bundle
from orchestrator.infra.agent_bundle import (
    AGENT_MODULES,
    NOT_SHIPPED,
    UNPACK_AGENT,
    agent_zipapp,
    bundle_files,
    packed_agent,
)
from stacks.builders import boot_script
from stacks.spec import ClusterSpec

NODE_DIR = Path(agent_bundle.__file__).resolve().parents[1] / "node"


def _imports(source: bytes) -> set[str]:
    tree = ast.parse(source)
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    names.discard("__future__")
    return names


def test_every_module_in_the_zipapp_uses_only_the_standard_library() -> None:
    for name, data in bundle_files().items():
        outside = {m for m in _imports(data) if not m.startswith("orchestrator.node")
                   and m.split(".")[0] not in sys.stdlib_module_names}
        assert not outside, f"{name} imports {outside}"


def test_the_zipapp_holds_exactly_what_the_agent_imports() -> None:
    """The agent's modules, found by following its imports from orchestrator/node/agent.py: every one is in the
    zipapp (AGENT_MODULES), and nothing more."""
    seen: set[str] = set()
    todo = ["agent"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for module in _imports((NODE_DIR / f"{name}.py").read_bytes()):
            if module.startswith("orchestrator."):
                assert module.startswith("orchestrator.node."), f"{name} imports {module}"
                todo.append(module.removeprefix("orchestrator.node."))
    assert seen == set(AGENT_MODULES) | set(NOT_SHIPPED)  # those the agent imports only where present


def test_the_rest_of_the_node_package_is_stdlib_only_but_node_storage() -> None:
    """orchestrator/node/ is the standard library's, but for node_storage (run with Sortie installed on the node)."""
    for path in sorted(NODE_DIR.glob("*.py")):
        if path.stem == "node_storage":
            continue
        outside = {m for m in _imports(path.read_bytes()) if not m.startswith("orchestrator.node")
                   and m.split(".")[0] not in sys.stdlib_module_names}
        assert not outside, f"{path.name} imports {outside}"


def test_the_zipapp_is_deterministic_and_has_a_main() -> None:
    first = agent_zipapp()
    agent_zipapp.cache_clear()
    assert agent_zipapp() == first
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        names = archive.namelist()
        assert names == sorted(names)
        assert "__main__.py" in names and "orchestrator/node/agent.py" in names
        assert "orchestrator/node/node_storage.py" not in names
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_the_packed_agent_unpacks_to_a_zipapp_that_runs(tmp_path: Path) -> None:
    """The boot script's own unpack command gives back the zipapp, and `python3 agent.pyz --help` works."""
    pyz = tmp_path / "agent.pyz"
    with pyz.open("wb") as out:
        subprocess.run(UNPACK_AGENT, shell=True, input=packed_agent().encode(), stdout=out, check=True, timeout=30)
    assert pyz.read_bytes() == agent_zipapp()
    proc = subprocess.run([sys.executable, "-I", str(pyz), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--sandbox" in proc.stdout


def test_an_aws_boot_script_fits_ec2_user_data() -> None:
    """EC2 takes 16 KiB of user data (stacks/builders/aws.py gzips the boot script). A zipapp deflated file by file
    and base64-encoded does not fit (about 18.6 KiB gzipped); the stored zipapp, bzip2-compressed, then base64,
    does: 15,119 bytes (14.8 KiB) with every option on (bucket tools, a container engine), 14,876 without; the
    one-file agent was 14,190. The agent grew to 15,691 (pool job users, issue 17); the modules' docstrings are now
    left out of the zipapp (`without_docstring`): 13,522. It grew again to 16,686 (issue 28: the agent's limits,
    disk-full reports, container confinement); comments and inner docstrings are now left out too: 13,103. The
    bound leaves the agent room to grow; past it, look at what ships."""
    spec = ClusterSpec(name="sortie-job-123-a1", infra="aws/us-east-1", token="x" * 43, node_package="sortie",
                       node_fuse=True, container_image="nvcr.io/nvidia/pytorch:24.01-py3")
    script = boot_script(spec, 0, "x" * 43, packed_agent())
    packed = len(gzip.compress(script.encode(), mtime=0))
    assert packed <= 15_500, packed  # EC2: 16_384


def test_the_local_provider_pickles_by_a_path_that_did_not_move() -> None:
    """Stacks in a user's state keep the local provider pickled by reference: it names stacks.builders.local only,
    so the regrouping of orchestrator/ needs no alias module for old stacks to be refreshed or destroyed."""
    from pulumi.dynamic.dynamic import serialize_provider

    from stacks.builders.local import LocalNodeProvider

    pickled = base64.b64decode(serialize_provider(LocalNodeProvider()))
    assert b"stacks.builders.local" in pickled and b"LocalNodeProvider" in pickled
    assert b"orchestrator" not in pickled


def test_the_zipapp_leaves_docstrings_and_comments_out_and_keeps_line_numbers() -> None:
    for name, data in bundle_files().items():
        if name == "__main__.py":
            continue
        source = (NODE_DIR.parent.parent / name).read_bytes()
        assert data.count(b"\n") == source.count(b"\n"), name  # a traceback names the source's lines
        assert ast.get_docstring(ast.parse(data)) is None, name
        tree = ast.parse(source)
        for node in ast.walk(tree):  # classes' and functions' docstrings ship as ""
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    first.value.value = ""
        code = [ast.dump(node) for node in tree.body[1:]]  # the same code, less the module's docstring
        assert [ast.dump(node) for node in ast.parse(data).body] == code, name
        assert b"#" not in data or all(not line.lstrip().startswith(b"#") for line in data.splitlines()), name
