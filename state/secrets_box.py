"""Secrets at rest in the state DB: Fernet-encrypted with a key generated once under the Sortie home
(0600). Job secrets and agent tokens are stored only this way, never in clear text.

Every controller that shares one state DB needs the same key: `$SORTIE_STATE_KEY` (what a cloud controller VM
gets, through the same secret channel as its DB URL) takes the place of the file. `check_key` tells at start
whether the key opens what the state holds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from orchestrator.config import private_once
from orchestrator.errors import SortieError

STATE_KEY_ENV = "SORTIE_STATE_KEY"


class SecretsBox:
    def __init__(self, home: Path) -> None:
        path = home / "secrets" / "state.key"
        given = os.environ.get(STATE_KEY_ENV, "").strip()
        key = given or private_once(path, lambda: Fernet.generate_key().decode())
        try:
            self._fernet = Fernet(key.strip().encode())
        except ValueError:
            where = f"${STATE_KEY_ENV}" if given else str(path)
            raise SortieError(f"the state key in {where} is not a valid key (32 url-safe base64 bytes)") from None
        self._path = path
        self.source = f"${STATE_KEY_ENV}" if given else str(path)
        self.key = key.strip()

    def seal(self, value: Any) -> str:
        return self._fernet.encrypt(json.dumps(value).encode()).decode()

    def open(self, sealed: str | None) -> Any:
        if not sealed:
            return None
        try:
            return json.loads(self._fernet.decrypt(sealed.encode()))
        except InvalidToken:
            raise SortieError(f"a secret in the state DB cannot be decrypted with {self.source}; "
                              "was the key replaced?") from None

    def opens(self, sealed: str) -> bool:
        try:
            self._fernet.decrypt(sealed.encode())
        except InvalidToken:
            return False
        return True


def key_problem(box: SecretsBox, samples: list[str]) -> str | None:
    """One line when the key opens none of `samples` (sealed values from the state), else None. Said at a
    controller's start, not per job: a controller sharing a DB with another home needs that home's key."""
    if not samples or any(box.opens(s) for s in samples):
        return None
    return (f"the state's secrets cannot be decrypted with {box.source}: this controller shares the state DB with "
            f"a Sortie home whose key differs; give it that key ({STATE_KEY_ENV}, or its secrets/state.key)")
