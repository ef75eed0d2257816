"""How secrets are kept: never in plain text, always compared in constant time.

Two kinds, two tools:

* **Client secrets** are machine-generated and high-entropy (at least ``MIN_CLIENT_SECRET_LENGTH``
  characters). Brute force is hopeless against them, so a slow hash would only make a reconnect storm of
  100k devices expensive. They are stored as HMAC-SHA256 under a server key (the *pepper*, kept outside
  the database), which costs ~1 µs and means a stolen database alone cannot even be used to test guesses.
* **User passwords** are human-chosen, so they get argon2id (argon2-cffi), deliberately slow; verification
  runs in a worker thread so it never stalls the event loop.

Stored forms carry a scheme prefix (``hmac-sha256$…``, ``$argon2id$…``) so schemes can be rotated.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from authhook.errors import ConfigError, InvalidInput

MIN_CLIENT_SECRET_LENGTH = 16
MIN_PEPPER_BYTES = 32
_HMAC_PREFIX = "hmac-sha256$"


def load_or_create_pepper(path: Path) -> bytes:
    """Read the server key from ``path``; create it (mode 0600) on first start."""
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        key = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key + b"\n")
        return key
    if len(data) < MIN_PEPPER_BYTES:
        raise ConfigError(f"secret key file `{path}` holds fewer than {MIN_PEPPER_BYTES} bytes")
    return data


class SecretHasher:
    """Hashes and checks both kinds of secret."""

    def __init__(self, pepper: bytes) -> None:
        if len(pepper) < MIN_PEPPER_BYTES:
            raise ConfigError(f"secret key must hold at least {MIN_PEPPER_BYTES} bytes")
        self._pepper = pepper
        self._argon2 = PasswordHasher()

    # -- client secrets ---------------------------------------------------------------------------
    def hash_client_secret(self, secret: str) -> str:
        if len(secret) < MIN_CLIENT_SECRET_LENGTH:
            raise InvalidInput(
                f"client secret is shorter than {MIN_CLIENT_SECRET_LENGTH} characters: "
                "use a generated secret (`authhook client add` makes one)"
            )
        return _HMAC_PREFIX + self._mac(secret)

    def _mac(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    def verify_client_secret(self, secret: str, stored: str) -> bool:
        if not stored.startswith(_HMAC_PREFIX):
            return False
        return hmac.compare_digest(self._mac(secret), stored[len(_HMAC_PREFIX) :])

    # -- user passwords ---------------------------------------------------------------------------
    def hash_password(self, password: str) -> str:
        if not password:
            raise InvalidInput("password must not be empty")
        return self._argon2.hash(password)

    def _verify_password_sync(self, password: str, stored: str) -> bool:
        try:
            return self._argon2.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify_password(self, password: str, stored: str) -> bool:
        return await asyncio.to_thread(self._verify_password_sync, password, stored)


def generate_client_secret() -> str:
    """A fresh 256-bit client secret, URL-safe."""
    return secrets.token_urlsafe(32)
