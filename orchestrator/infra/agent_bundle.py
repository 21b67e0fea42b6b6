"""Infra, between the node package and the boot scripts: the node agent as one zipapp for cloud VMs and pods, and
the command that starts it from the installed package on the local cloud.

The zipapp holds the agent's modules (`orchestrator/node/`, standard library only) and a `__main__` that calls
`orchestrator.node.agent.main`; run it as `python3 agent.pyz --sandbox DIR ...`. It is deterministic (fixed
timestamps and modes, sorted entries), so an unchanged agent gives byte-identical boot scripts and no
stack diff. Left out: `node_view.py` (the path view runs as a script file beside the agent, which a zipapp has not;
cloud nodes run without `--confine`), `node_storage.py` (runs with Sortie installed on the node), `nofollow.py`
(what `POST /links` resolves a target with: only local-cloud nodes link to a directory, a local-store bucket's; a
cloud node refuses a target) and `isolation.py` (a probe on the controller's machine).
"""

from __future__ import annotations

import base64
import bz2
import functools
import io
import os
import sys
import zipfile
from pathlib import Path

import orchestrator

ROOT = Path(orchestrator.__file__).resolve().parent.parent
NODE_DIR = ROOT / "orchestrator" / "node"
# The agent's modules, what `orchestrator.node.agent` imports (a test checks this list against its imports).
AGENT_MODULES = ("agent", "agent_files", "agent_http", "container", "runs", "watch")
# Imported by the agent where present, not shipped yet: the boot script is at EC2's 16 KiB of user data (issue 24).
NOT_SHIPPED = ("notices",)
AGENT_ENTRY = "orchestrator.node.agent"
MAIN = "from orchestrator.node.agent import main\n\nmain()\n"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold: no build time in the archive


def without_docstring(source: bytes) -> bytes:
    """A module's source less its leading docstring (the docs stay in Sortie's source; EC2's 16 KiB of user data
    is better spent on code), the line count kept, so tracebacks name the same lines."""
    if not source.startswith(b'"""'):
        return source
    end = source.find(b'"""', 3)
    return b"\n" * source.count(b"\n", 0, end) + source[end + 3:] if end > 0 else source


def without_comments_or_inner_docstrings(source: bytes) -> bytes:
    """The source less its comments and its classes' and functions' docstrings (each docstring becomes `""`), every
    line kept where it was, so tracebacks name the same lines; the code itself is unchanged."""
    import ast
    import tokenize

    lines = source.decode().splitlines(keepends=True)
    for token in tokenize.generate_tokens(io.StringIO(source.decode()).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col].rstrip() + "\n"
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)) or first.end_lineno is None:
            continue
        head = lines[first.lineno - 1]
        if head[:first.col_offset].strip():  # `def f(): """..."""` on one line: left as it is
            continue
        lines[first.lineno - 1] = head[:first.col_offset] + '""\n'
        for row in range(first.lineno, first.end_lineno):
            lines[row] = "\n"
    return "".join(lines).encode()


def bundle_files() -> dict[str, bytes]:
    """Name in the zipapp -> content, for every file it holds (docstrings and comments left out, lines kept:
    `without_docstring`, `without_comments_or_inner_docstrings`)."""
    files = {
        "__main__.py": MAIN.encode(),
        "orchestrator/__init__.py": without_docstring((ROOT / "orchestrator" / "__init__.py").read_bytes()),
        "orchestrator/node/__init__.py": without_docstring((NODE_DIR / "__init__.py").read_bytes()),
    }
    for name in AGENT_MODULES:
        source = without_docstring((NODE_DIR / f"{name}.py").read_bytes())
        files[f"orchestrator/node/{name}.py"] = without_comments_or_inner_docstrings(source)
    return files


@functools.cache
def agent_zipapp() -> bytes:
    """The zipapp's bytes (built once per process). Entries are stored, not deflated: what ships it compresses the
    whole archive at once (`packed_agent`), which is smaller than a zip's file-by-file deflate."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in sorted(bundle_files().items()):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # Unix, wherever it is built
            info.external_attr = 0o100644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def agent_zipapp_base64() -> str:
    """The zipapp as one base64 string (a Kubernetes ConfigMap's binaryData)."""
    return base64.b64encode(agent_zipapp()).decode()


def packed_agent() -> str:
    """The zipapp bzip2-compressed and base64-encoded, in lines of 76 characters: a here-document in a boot script,
    turned back into the zipapp on the node by `UNPACK_AGENT`. bzip2 because it is the smallest of the stdlib's
    codecs here, and EC2 takes 16 KiB of (gzipped) user data: measured in tests/unit/test_agent_bundle.py."""
    encoded = base64.b64encode(bz2.compress(agent_zipapp(), 9)).decode()
    return "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))


# A shell command reading `packed_agent()` on stdin and writing the zipapp on stdout (python3 is what the agent
# needs on a node anyway; bzip2 and base64 tools may be missing from a slim image).
UNPACK_AGENT = ("python3 -c 'import base64, bz2, sys; "
                "sys.stdout.buffer.write(bz2.decompress(base64.b64decode(sys.stdin.read())))'")


def local_agent_command() -> list[str]:
    """The agent's command on this machine (local-cloud nodes, tests): the installed package's module, with `-P` so
    the node's working directory never shadows it."""
    return [sys.executable, "-P", "-m", AGENT_ENTRY]


def local_agent_env(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with Sortie's own root first on PYTHONPATH, so `local_agent_command` imports this very package."""
    paths = [str(ROOT), *(p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT))]
    return {**environ, "PYTHONPATH": os.pathsep.join(paths)}
