"""Secrets at rest in the state DB: Fernet-encrypted with a key generated once under the Sortie home
(0600). Job secrets and agent tokens are stored only this way, never in clear text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from orchestrator.config import private_once
from orchestrator.errors import SortieError


class SecretsBox:
    def __init__(self, home: Path) -> None:
        path = home / "secrets" / "state.key"
        key = private_once(path, lambda: Fernet.generate_key().decode())
        self._fernet = Fernet(key.strip().encode())
        self._path = path

    def seal(self, value: Any) -> str:
        return self._fernet.encrypt(json.dumps(value).encode()).decode()

    def open(self, sealed: str | None) -> Any:
        if not sealed:
            return None
        try:
            return json.loads(self._fernet.decrypt(sealed.encode()))
        except InvalidToken:
            raise SortieError(f"a secret in the state DB cannot be decrypted with {self._path}; "
                              "was the key replaced?") from None
