"""Provider API keys at rest: encrypted in PostgreSQL, plain only in memory.

A community may bring its own provider key. A database dump, a replica or a
`SELECT *` in a support session must not hand that key out, so the column
holds a Fernet token and the plain key exists only inside a `Secret`, whose
`repr`/`str` are masked: a profile that ends up in a log line, a traceback or
a debugger shows `sk-…abcd`, never the key.

`CONFIG_ENCRYPTION_KEY` is a comma list of Fernet keys, newest first
(`MultiFernet`): new tokens use the first key, any key decrypts. To rotate,
put a new key in front, deploy, run `waddle-ai config rotate-key` (every token
re-encrypted with the newest key in one transaction), then drop the old key.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from domain.secret import Secret
from schemas.errors import WaddleError

ENV_NAME = "CONFIG_ENCRYPTION_KEY"


class KeyBoxError(WaddleError, ValueError):
    """Encryption is impossible as configured; the message never contains a key."""


class EncryptionDisabledError(KeyBoxError):
    def __init__(self) -> None:
        super().__init__(
            f"storing a provider key needs {ENV_NAME} (generate one with "
            "`python -c 'from config.secrets import generate_key; print(generate_key())'`)"
        )


class DecryptionError(KeyBoxError):
    def __init__(self) -> None:
        super().__init__(
            f"a stored provider key cannot be decrypted with {ENV_NAME}: was the key it "
            "was encrypted with removed before `config rotate-key` ran?"
        )


def generate_key() -> str:
    """A new Fernet key for `CONFIG_ENCRYPTION_KEY` (urlsafe base64 of 32 random bytes)."""
    return Fernet.generate_key().decode("ascii")


class KeyBox:
    """Encrypts with the newest key, decrypts with any: what makes rotation possible."""

    def __init__(self, keys: Sequence[str]) -> None:
        fernets: list[Fernet] = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key.strip().encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                # The message names the position, never the (secret) value.
                raise KeyBoxError(
                    f"{ENV_NAME}: key #{position} is not a Fernet key (32 url-safe "
                    "base64-encoded bytes)"
                ) from None
        self._multi: MultiFernet | None = MultiFernet(fernets) if fernets else None
        self._count = len(fernets)

    @classmethod
    def disabled(cls) -> KeyBox:
        """No key configured: reading plain fields works, storing a provider key is refused."""
        return cls(())

    @classmethod
    def from_setting(cls, value: str | None) -> KeyBox:
        """`CONFIG_ENCRYPTION_KEY` as written in the environment: `newest,older,...`."""
        if value is None or not value.strip():
            return cls.disabled()
        return cls([part for part in value.split(",") if part.strip()])

    @property
    def enabled(self) -> bool:
        return self._multi is not None

    @property
    def key_count(self) -> int:
        return self._count

    def _require(self) -> MultiFernet:
        if self._multi is None:
            raise EncryptionDisabledError()
        return self._multi

    def encrypt(self, plaintext: str) -> str:
        return self._require().encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        if self._multi is None:
            raise KeyBoxError(f"reading a stored provider key needs {ENV_NAME}")
        try:
            return self._multi.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise DecryptionError() from None

    def decrypt_secret(self, token: str) -> Secret:
        return Secret(self.decrypt(token))

    def rotate(self, token: str) -> str:
        """The same plaintext under the newest key (a no-op in meaning, new bytes)."""
        multi = self._require()
        try:
            return multi.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError):
            raise DecryptionError() from None

    def __repr__(self) -> str:
        return f"KeyBox(keys={self._count})"


__all__ = [
    "DecryptionError",
    "EncryptionDisabledError",
    "KeyBox",
    "KeyBoxError",
    "generate_key",
]
