"""Snowflake key-pair authentication, as the local servers check it: one place for both endpoints.

A client with a private key signs a JWT (RS256) with ``sub`` = ``ACCOUNT.USER`` and ``iss`` =
``ACCOUNT.USER.SHA256:<base64 sha256 of the DER public key>``; Snowflake accepts it when it verifies
against the public key registered for that user (``ALTER USER ... SET RSA_PUBLIC_KEY``) and has
not expired. The local SQL login (``pgsnow.local.snowflake``) and the local Snowpipe REST endpoint
(``pgsnow.local.snowpipe``) both verify through ``PublicKeys.verify``, against one registry.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

INVALID_JWT_CODE = "390144"
INVALID_JWT_MESSAGE = "JWT token is invalid."
_PEM_HEADER = "-----BEGIN PUBLIC KEY-----"


def public_key_fingerprint(public_key: RSAPublicKey) -> str:
    """``SHA256:<base64>`` of the DER SubjectPublicKeyInfo, as Snowflake shows RSA_PUBLIC_KEY_FP."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def jwt_account_name(account: str) -> str:
    """The account as clients put it into the token: upper case, without a region/cloud suffix."""
    return account.upper().split(".")[0]


def load_rsa_public_key(text: str | bytes) -> RSAPublicKey:
    """A public key as PEM, or as ``ALTER USER ... SET RSA_PUBLIC_KEY`` takes it: the base64 body alone."""
    pem = text.decode("ascii") if isinstance(text, bytes) else text
    if _PEM_HEADER not in pem:
        body = "".join(pem.split())
        pem = f"{_PEM_HEADER}\n{body}\n-----END PUBLIC KEY-----\n"
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    if not isinstance(key, RSAPublicKey):
        raise ValueError("RSA_PUBLIC_KEY must be an RSA public key")
    return key


@dataclass
class PublicKeys:
    """Each user's registered public key (user names upper case, as Snowflake stores unquoted names)."""

    account: str
    _keys: dict[str, RSAPublicKey] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, user: str, public_key: str | bytes) -> str:
        """``ALTER USER <user> SET RSA_PUBLIC_KEY = ...``; returns the key's fingerprint."""
        key = load_rsa_public_key(public_key)
        with self._lock:
            self._keys[user.upper()] = key
        return public_key_fingerprint(key)

    def has_key(self, user: str) -> bool:
        with self._lock:
            return user.upper() in self._keys

    def verify(self, token: str, *, user: str | None = None, account: str | None = None) -> str | None:
        """The (upper-case) user a valid token belongs to, or None.

        With ``user``, the token must also be that user's (the login request names the user
        separately from the token); ``account`` overrides the registry's account name.
        """
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        subject = str(claims.get("sub", ""))
        account_part, _, token_user = subject.partition(".")
        if account_part != jwt_account_name(account or self.account) or not token_user:
            return None
        if user is not None and token_user.upper() != user.upper():
            return None
        with self._lock:
            public_key = self._keys.get(token_user.upper())
        if public_key is None:
            return None
        try:
            verified = jwt.decode(
                token, public_key, algorithms=["RS256"], options={"require": ["exp", "iat", "iss", "sub"]}
            )
        except jwt.PyJWTError:
            return None
        if verified.get("iss") != f"{subject}.{public_key_fingerprint(public_key)}":
            return None
        return token_user.upper()
