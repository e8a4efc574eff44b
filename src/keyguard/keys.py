"""The API-key format: generation, offline validation, digests and display hints.

A key reads ``<prefix>_<env>_<random><checksum>``, e.g. ``kg_live_`` + 32 base62
characters from :mod:`secrets` + a 6-character base62 CRC32 of everything before it.
The checksum lets a typo or a random string be refused without touching storage, and
lets secret scanners recognise a leaked key with few false positives (the scheme
GitHub uses for its tokens).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

from .errors import ConfigurationError, InvalidCredential

__all__ = [
    "BASE62",
    "KeyFormat",
    "KeyHasher",
    "ParsedKey",
    "Secret",
    "base62",
]

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET = frozenset(BASE62)
CHECKSUM_LENGTH = 6
MIN_RANDOM_LENGTH = 32
MAX_KEY_LENGTH = 255
_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")


def base62(number: int, width: int) -> str:
    """``number`` in base62, left-padded with ``0`` to ``width`` characters."""
    digits = []
    while number:
        number, rest = divmod(number, 62)
        digits.append(BASE62[rest])
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(body: str) -> str:
    """The 6-character base62 CRC32 of ``body`` (CRC32 < 62**6, so it always fits)."""
    return base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


class Secret:
    """A raw API key. ``repr`` and ``str`` mask it so it cannot reach a log by accident.

    Call :meth:`reveal` where the key must really be shown (once, to its owner).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The key itself. Show it to its owner once; never log it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str:  # pragma: no cover - refusing is the behaviour
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key that passed the offline checks: known prefix and environment, good checksum."""

    prefix: str
    env: str
    secret: Secret


@dataclass(frozen=True, slots=True)
class KeyFormat:
    """The shape of this deployment's keys.

    :param prefix: the first part of every key (``kg``); lower-case letters and digits.
    :param environments: the environments keys may name; the first is used by default.
    :param random_length: base62 characters of randomness (at least 32, about 190 bits).
    """

    prefix: str = "kg"
    environments: tuple[str, ...] = ("live", "test")
    random_length: int = MIN_RANDOM_LENGTH

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.prefix):
            raise ConfigurationError(
                "key prefix must be 1-16 lower-case letters or digits, starting with a letter"
            )
        if not self.environments or not all(_NAME.fullmatch(e) for e in self.environments):
            raise ConfigurationError(
                "key environments must be 1-16 lower-case letters or digits each"
            )
        longest = len(self.prefix) + max(map(len, self.environments)) + 2
        if not MIN_RANDOM_LENGTH <= self.random_length <= MAX_KEY_LENGTH - longest - 6:
            raise ConfigurationError(
                f"random_length must be between {MIN_RANDOM_LENGTH} and "
                f"{MAX_KEY_LENGTH - longest - 6}"
            )

    @property
    def pattern(self) -> str:
        """A regular expression that matches this deployment's keys, for secret scanners."""
        envs = "|".join(re.escape(e) for e in self.environments)
        return (
            rf"\b{re.escape(self.prefix)}_(?:{envs})_"
            rf"[0-9A-Za-z]{{{self.random_length + CHECKSUM_LENGTH}}}\b"
        )

    def generate(self, env: str | None = None) -> Secret:
        """A fresh key from :mod:`secrets`."""
        env = self.environments[0] if env is None else env
        if env not in self.environments:
            raise ConfigurationError(f"unknown key environment; use one of {self.environments}")
        random = "".join(secrets.choice(BASE62) for _ in range(self.random_length))
        body = f"{self.prefix}_{env}_{random}"
        return Secret(body + checksum(body))

    def parse(self, raw: str | Secret) -> ParsedKey:
        """Check a presented key offline; raise :class:`InvalidCredential` if it is not one.

        Costs a few microseconds and never more for a long input: the length is
        checked before anything else.
        """
        text = raw.reveal() if isinstance(raw, Secret) else raw
        expected = len(self.prefix) + self.random_length + CHECKSUM_LENGTH + 2
        if len(text) > MAX_KEY_LENGTH or not text.isascii():
            raise InvalidCredential("malformed")
        prefix, sep, rest = text.partition("_")
        env, sep2, tail = rest.partition("_")
        if (
            not (sep and sep2)
            or prefix != self.prefix
            or env not in self.environments
            or len(text) != expected + len(env)
            or not _BASE62_SET.issuperset(tail)
            or not hmac.compare_digest(checksum(text[:-CHECKSUM_LENGTH]), tail[-CHECKSUM_LENGTH:])
        ):
            raise InvalidCredential("malformed")
        return ParsedKey(prefix, env, raw if isinstance(raw, Secret) else Secret(text))

    def hint(self, key: Secret) -> str:
        """A display hint such as ``kg_live_AbCd…wxyz``: enough to recognise, not to use."""
        text = key.reveal()
        head_len = text.index("_", len(self.prefix) + 1) + 1 + 4
        return f"{text[:head_len]}…{text[-4:]}"


class KeyHasher:
    """Turns a key into the digest that storage keeps.

    SHA-256 by default; HMAC-SHA256 when a server-side ``pepper`` is configured, so a
    stolen database alone cannot be used to test guessed keys.

    **Security note**: changing the pepper makes every stored key unusable.
    """

    __slots__ = ("_pepper",)

    def __init__(self, pepper: str | bytes | None = None) -> None:
        if isinstance(pepper, str):
            pepper = pepper.encode()
        if pepper is not None and len(pepper) < 16:
            raise ConfigurationError("pepper must be at least 16 bytes")
        self._pepper = pepper

    def __repr__(self) -> str:
        return f"KeyHasher(peppered={self._pepper is not None})"

    def digest(self, key: Secret) -> str:
        """The hex digest of a key."""
        data = key.reveal().encode()
        if self._pepper is None:
            return hashlib.sha256(data).hexdigest()
        return hmac.new(self._pepper, data, hashlib.sha256).hexdigest()
