"""The local servers' key-pair check: which tokens Snowflake would accept."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pgsnow.local.keypair import PublicKeys, load_rsa_public_key, public_key_fingerprint

pytestmark = pytest.mark.unit

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ACCOUNT = "pgsnow-local"


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def token(
    signer: rsa.RSAPrivateKey = KEY,
    *,
    account: str = "PGSNOW-LOCAL",
    user: str = "LOADER",
    fingerprint_of: rsa.RSAPrivateKey = KEY,
    expires_in: int = 60,
) -> str:
    """A token shaped as the connector and the ingest SDK sign it."""
    now = dt.datetime.now(dt.UTC)
    claims: dict[str, Any] = {
        "iss": f"{account}.{user}.{public_key_fingerprint(fingerprint_of.public_key())}",
        "sub": f"{account}.{user}",
        "iat": now,
        "exp": now + dt.timedelta(seconds=expires_in),
    }
    return jwt.encode(claims, signer, algorithm="RS256")


@pytest.fixture
def keys() -> PublicKeys:
    registry = PublicKeys(ACCOUNT)
    registry.register("loader", pem(KEY))
    return registry


def test_a_token_signed_by_the_registered_key_is_the_users(keys: PublicKeys) -> None:
    assert keys.verify(token()) == "LOADER"
    assert keys.verify(token(), user="loader") == "LOADER"


@pytest.mark.parametrize(
    ("made", "user", "account"),
    [
        pytest.param(lambda: token(OTHER_KEY, fingerprint_of=OTHER_KEY), None, None, id="other-key"),
        pytest.param(lambda: token(fingerprint_of=OTHER_KEY), None, None, id="wrong-fingerprint-in-iss"),
        pytest.param(lambda: token(expires_in=-120), None, None, id="expired"),
        pytest.param(lambda: token(user="SOMEONE"), None, None, id="user-without-key"),
        pytest.param(lambda: token(account="ELSEWHERE"), None, None, id="other-account"),
        pytest.param(token, "SOMEONE", None, id="login-names-another-user"),
        pytest.param(token, None, "other", id="login-to-another-account"),
        pytest.param(lambda: "not-a-jwt", None, None, id="garbage"),
    ],
)
def test_tokens_snowflake_refuses(keys: PublicKeys, made: Any, user: str | None, account: str | None) -> None:
    assert keys.verify(made(), user=user, account=account) is None


def test_a_region_suffixed_account_is_the_same_account(keys: PublicKeys) -> None:
    # Clients put the account into the token without its region; the login may name it with one.
    assert keys.verify(token(), account="pgsnow-local.us-east-1") == "LOADER"


def test_alter_user_takes_the_bare_base64_body() -> None:
    der = KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = base64.b64encode(der).decode()

    loaded = load_rsa_public_key(body[:40] + "\n" + body[40:])

    assert public_key_fingerprint(loaded) == public_key_fingerprint(KEY.public_key())


def test_a_key_that_is_not_rsa_is_refused() -> None:
    with pytest.raises(ValueError):
        load_rsa_public_key("bm90IGEga2V5")
