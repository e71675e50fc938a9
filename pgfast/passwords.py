"""Checking passwords against the secrets PostgreSQL stores in pg_authid.rolpassword.

Secrets come in PostgreSQL's three shapes: a SCRAM-SHA-256 secret
(`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, see scram.py), an md5 hash
(`md5` + 32 hex digits of md5(password || user)), or (from old clusters) plain text:
anything that is neither of the other two, as PostgreSQL's get_password_type says.
"""
from __future__ import annotations

import hashlib
import hmac
import string

from .scram import SCRAM, parse_scram, verify_plain_password

_HEX = frozenset(string.hexdigits.lower())


def is_md5(secret: str | None) -> bool:
    return bool(secret) and len(secret) == 35 and secret.startswith("md5") and set(secret[3:]) <= _HEX


def md5_salted(secret_md5: str, salt: bytes) -> bytes:
    """What a client must answer to an MD5 challenge for this stored md5 secret."""
    return b"md5" + hashlib.md5(secret_md5[3:].encode("ascii") + salt).hexdigest().encode()


def check_plain_password(secret: str | None, password: bytes, user: str) -> bool:
    """The `password` method: the cleartext (bytes, as the client sent them) against
    whatever is stored."""
    if not secret:
        return False
    scram = parse_scram(secret)
    if scram is not None:
        return verify_plain_password(scram, password)
    if secret.startswith(SCRAM + "$"):
        return False        # a secret we could not parse matches nothing
    if is_md5(secret):
        expected = "md5" + hashlib.md5(password + user.encode("utf-8", "surrogateescape")).hexdigest()
        return hmac.compare_digest(expected.encode(), secret.encode())
    return hmac.compare_digest(password, secret.encode("utf-8", "surrogateescape"))
