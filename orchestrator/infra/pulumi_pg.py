"""Pulumi's stack state in PostgreSQL (issue 14): the engine's DIY backend `postgres://...?table=...`.

Where this sits: infra, beside the Pulumi driver. The engine reads and writes the table itself; Sortie only looks:
- `check_backend`: before anything runs, the database answers and the table can be made (one clear line if not);
- `backend_locks` and `stale_locks`: the stack locks in the table, and which of them a dead replica left;
- `passphrase_problem`: whether this replica's passphrase opens the stacks already there.

Keys in the table are `<database>/.pulumi/...`, values `{"data": <base64 of the file's bytes>}`, as the engine's
bucket driver writes them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from orchestrator.errors import SortieError

SCHEME = "postgres://"
DEFAULT_TABLE = "pulumi_state"
CONNECT_TIMEOUT = 5
_TABLE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def is_postgres(url: str | None) -> bool:
    return bool(url) and str(url).startswith(SCHEME)


def safe_url(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def dsn_and_table(url: str) -> tuple[str, str]:
    """The libpq DSN (the engine's own parameter `table` removed) and the table's name."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    table = next((v for k, v in query if k == "table"), DEFAULT_TABLE)
    if not table or set(table) - _TABLE_CHARS or len(table) > 63:
        raise SortieError(f"pulumi.backend_url: table {table!r} must be 1-63 lowercase letters, digits or _")
    rest = [(k, v) for k, v in query if k != "table"]
    if not any(k == "connect_timeout" for k, _ in rest):
        rest.append(("connect_timeout", str(CONNECT_TIMEOUT)))
    return urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), "")), table


def _connect(url: str) -> Any:
    try:
        import psycopg2
    except ModuleNotFoundError:
        raise SortieError("pulumi.backend_url is PostgreSQL, but psycopg2 is not installed "
                          "(pip install 'sortie[postgres]')") from None
    dsn, _ = dsn_and_table(url)
    try:
        return psycopg2.connect(dsn)
    except psycopg2.Error as exc:
        detail = (str(exc).strip().splitlines() or ["no answer"])[0]
        raise SortieError(f"pulumi.backend_url {safe_url(url)}: cannot connect: {detail}") from None


def check_backend(url: str) -> None:
    """The database answers and the state table exists or can be made (the engine's own schema); else one line
    that says which."""
    import psycopg2

    _, table = dsn_and_table(url)
    conn = _connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, data JSON NOT NULL, "
                        "updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now())")
    except psycopg2.Error as exc:
        detail = (str(exc).strip().splitlines() or ["refused"])[0]
        raise SortieError(f"pulumi.backend_url {safe_url(url)}: cannot create or use the table {table}: "
                          f"{detail}") from None
    finally:
        conn.close()


def _rows(url: str, infix: str, *, suffix: str = "", newest: int | None = None) -> list[tuple[str, bytes]]:
    """(key, file bytes) of the table's rows whose key contains `infix` (and ends with `suffix`); `newest`: only
    that many, the most recently written first."""
    _, table = dsn_and_table(url)
    order = f"updated_at DESC LIMIT {int(newest)}" if newest else "key"  # table: checked by dsn_and_table
    conn = _connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT key, data::text FROM {table} WHERE key LIKE %s ORDER BY {order}",
                        (f"%{infix}%{suffix}",))
            rows = cur.fetchall()
    finally:
        conn.close()
    out = []
    for key, text in rows:
        try:
            out.append((key, base64.b64decode(json.loads(text)["data"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


@dataclass(frozen=True)
class BackendLock:
    stack: str
    host: str
    pid: int


def backend_locks(url: str) -> list[BackendLock]:
    """Every stack lock in the table (`.pulumi/locks/<org>/<project>/<stack>/<id>.json`)."""
    locks = []
    for key, data in _rows(url, "/.pulumi/locks/"):
        parts = key.split("/")
        try:
            content = json.loads(data)
        except ValueError:
            content = {}
        locks.append(BackendLock(parts[-2] if len(parts) >= 2 else "", str(content.get("hostname") or ""),
                                 int(content.get("pid") or 0)))
    return locks


def stale_locks(locks: Iterable[BackendLock], live_hosts: set[str], pid_alive: Callable[[int], bool],
                this_host: str | None = None) -> list[str]:
    """Stacks whose every lock is stale. A lock of this host is stale when its process is gone; a lock of another
    host only when no replica there holds a live lease (`live_hosts`): that host's operations may still run."""
    this_host = this_host or socket.gethostname()
    verdict: dict[str, bool] = {}
    for lock in locks:
        stale = (not pid_alive(lock.pid)) if lock.host == this_host else lock.host not in live_hosts
        verdict[lock.stack] = verdict.get(lock.stack, True) and stale
    return sorted(stack for stack, stale in verdict.items() if stale)


def _opens(phrase: str, salt_state: str) -> bool:
    """Whether `phrase` opens a passphrase secrets manager's state `v1:<salt>:v1:<nonce>:<ciphertext>` (the engine
    encrypts the word "pulumi" with a PBKDF2-SHA256 key, 1,000,000 rounds, and AES-256-GCM)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    parts = salt_state.split(":")
    if len(parts) != 5 or parts[0] != "v1" or parts[2] != "v1":
        return True  # not a state we know how to check: let the engine judge
    try:
        salt, nonce, sealed = (base64.b64decode(p) for p in (parts[1], parts[3], parts[4]))
    except ValueError:
        return True
    key = hashlib.pbkdf2_hmac("sha256", phrase.encode(), salt, 1_000_000, 32)
    try:
        return AESGCM(key).decrypt(nonce, sealed, None) == b"pulumi"
    except InvalidTag:
        return False


def passphrase_problem(url: str, phrase: str, project: str) -> str | None:
    """None when the passphrase opens the newest stack of `project` already in the table (or there is none); else
    the line to refuse a replica's start with."""
    for key, data in _rows(url, f"/.pulumi/stacks/{project}/", suffix=".json", newest=3):
        try:
            checkpoint = json.loads(data).get("checkpoint") or {}
            provider = (checkpoint.get("latest") or {}).get("secrets_providers") or {}
        except (ValueError, AttributeError):
            continue
        if provider.get("type") != "passphrase" or not (provider.get("state") or {}).get("salt"):
            continue
        if _opens(phrase, provider["state"]["salt"]):
            return None
        stack = key.rsplit("/", 1)[-1].removesuffix(".json")
        return (f"the Pulumi passphrase of this replica cannot open stack {stack} in {safe_url(url)}: every replica "
                "needs the same passphrase (copy the first replica's secrets/pulumi-passphrase, or set "
                "PULUMI_CONFIG_PASSPHRASE_FILE)")
    return None
