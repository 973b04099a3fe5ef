"""API keys and tenants (issue item 7).

Each key maps to a tenant id; everything a tenant creates is stored with that id and is
invisible (404) to other tenants. Two modes:

* keys configured (``Settings.api_keys`` and/or ``Settings.api_keys_file``): only those keys
  are accepted; a file line ``KEY TENANT`` names the tenant (several keys may share one),
  a bare ``KEY`` is its own tenant.
* nothing configured (a single-user local server): any well-formed ``tml-`` key is accepted
  and each distinct key is its own tenant.

Tenant ids derived from keys are a hash (``key-<sha256 prefix>``), so raw keys never reach
the database or the logs. Keys are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from tx_server.errors import UnauthorizedError
from tx_server.settings import Settings

__all__ = ["Keyring", "tenant_of_key"]

_KEY_PATTERN = re.compile(r"tml-[A-Za-z0-9_\-.]{1,256}")


def tenant_of_key(key: str) -> str:
    """The default tenant id of a key: a stable hash, never the key itself."""
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def _read_keys_file(path: Path) -> dict[str, str]:
    keys: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2 or not _KEY_PATTERN.fullmatch(parts[0]):
            raise ValueError(
                f"{path}:{lineno}: expected 'KEY [TENANT]' with a tml- key, got {line[:12]!r}..."
            )
        keys[parts[0]] = parts[1] if len(parts) == 2 else tenant_of_key(parts[0])
    return keys


class Keyring:
    """Resolves an ``X-API-Key`` header to a tenant id or raises UnauthorizedError."""

    def __init__(self, keys: dict[str, str] | None) -> None:
        """``keys`` maps key → tenant; None means open mode (any ``tml-`` key)."""
        self._keys = keys

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        if not settings.api_keys and settings.api_keys_file is None:
            return cls(None)
        keys = {
            k.get_secret_value(): tenant_of_key(k.get_secret_value()) for k in settings.api_keys
        }
        if settings.api_keys_file is not None:
            keys.update(_read_keys_file(settings.api_keys_file))
        if not keys:
            # Fail closed, and loudly: a server that answers every request with 401 looks like
            # a client bug, and falling back to open mode would expose what the file guards.
            raise ValueError(
                f"{settings.api_keys_file} holds no API keys, so every request would get 401; "
                "add 'tml-... [TENANT]' lines, or configure no keys file for a local server"
            )
        return cls(keys)

    @property
    def open_mode(self) -> bool:
        return self._keys is None

    def tenant_for(self, key: str | None) -> str:
        """The tenant of ``key``; UnauthorizedError when missing, malformed or unknown."""
        if not key:
            raise UnauthorizedError("missing X-API-Key header")
        if not _KEY_PATTERN.fullmatch(key):
            raise UnauthorizedError("malformed API key: expected 'tml-' followed by [A-Za-z0-9_-.]")
        if self._keys is None:
            return tenant_of_key(key)
        tenant = None
        for known, known_tenant in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                tenant = known_tenant
        if tenant is None:
            raise UnauthorizedError("unknown API key")
        return tenant
