"""Access tokens (HS256 JWTs) and API key secrets."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

import jwt

from ingestion_grpc.errors import Unauthenticated

API_KEY_PREFIX = "ik_"
_ISSUER = "ingestion-grpc"


def issue_access_token(user_id: str, secret: str, lifetime: timedelta) -> str:
    now = datetime.now(UTC)
    claims = {"sub": user_id, "iat": now, "exp": now + lifetime, "iss": _ISSUER}
    return jwt.encode(claims, secret, algorithm="HS256")


def user_id_from_access_token(token: str, secret: str) -> str:
    """The token's user id; Unauthenticated if it is malformed, forged or expired."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            issuer=_ISSUER,
            options={"require": ["sub", "exp", "iat", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("The access token has expired.") from None
    except jwt.InvalidTokenError:
        raise Unauthenticated("The access token is not valid.") from None
    subject = claims["sub"]
    if not isinstance(subject, str):
        raise Unauthenticated("The access token is not valid.")
    return subject


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def api_key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
