"""Users, sign-in, API keys, and turning request credentials into a Principal."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ingestion_grpc.auth.login_limits import LoginThrottle
from ingestion_grpc.auth.passwords import hash_password, verify_password
from ingestion_grpc.auth.permissions import Principal, Role
from ingestion_grpc.auth.tokens import (
    api_key_hash,
    issue_access_token,
    new_api_key,
    user_id_from_access_token,
)
from ingestion_grpc.db.models import ApiKey, User
from ingestion_grpc.db.session import UnitOfWork
from ingestion_grpc.domain import audit
from ingestion_grpc.errors import Conflict, InvalidArgument, NotFound, Unauthenticated

log = logging.getLogger(__name__)

_BAD_LOGIN = "Invalid email or password."
MAX_API_KEY_DAYS = 730


@dataclass(frozen=True)
class CreatedApiKey:
    """A new key and its secret, which exists only in this response."""

    record: ApiKey
    secret: str


def normalise_email(email: str, field: str = "email") -> str:
    email = email.strip().lower()
    local, _, domain = email.partition("@")
    if not local or "." not in domain or " " in email:
        raise InvalidArgument(field, "must be an email address")
    return email


def _email_or_nothing(text: str) -> str:
    """`text` if it is an email address, else "": what someone typed into the
    email field may be a password."""
    try:
        return normalise_email(text)
    except InvalidArgument:
        return ""


def create_user(uow: UnitOfWork, email: str, password: str, role: Role) -> User:
    if len(password) < 8:
        raise InvalidArgument("password", "must be at least 8 characters")
    user = User(email=normalise_email(email), password_hash=hash_password(password), role=role)
    uow.session.add(user)
    try:
        uow.session.flush()
    except IntegrityError:
        raise Conflict(f"A user with email {user.email} already exists.") from None
    return user


def ensure_first_admin(uow: UnitOfWork, email: str, password: str | None) -> str | None:
    """Create the first admin if there are no users; return a generated password.

    The caller prints a generated password once; it is never stored in clear.
    """
    if uow.session.scalar(select(User.id).limit(1)) is not None:
        return None
    generated = None
    if not password:
        generated = password = secrets.token_urlsafe(18)
    create_user(uow, email, password, Role.ADMIN)
    return generated


def login(
    uow: UnitOfWork,
    email: str,
    password: str,
    jwt_secret: str,
    lifetime: timedelta,
    *,
    throttle: LoginThrottle,
    client_address: str,
) -> tuple[str, User]:
    """A token for the user, or Unauthenticated (TooManyLogins past the limits).

    A refused attempt is recorded in the audit trail (the email tried, never
    the password); the caller commits it before answering.
    """
    throttle.attempt(email, client_address)
    user = uow.session.scalar(select(User).where(User.email == email.strip().lower()))
    if not verify_password(user.password_hash if user else None, password) or user is None:
        audit.record_failed_login(
            uow,
            _email_or_nothing(email),
            user.id if user else None,
            {"reason": "invalid_credentials", "clientAddress": client_address},
        )
        raise Unauthenticated(_BAD_LOGIN)
    throttle.succeeded(email, client_address)
    return issue_access_token(user.id, jwt_secret, lifetime), user


def authenticate(
    uow: UnitOfWork, authorization: str | None, api_key: str | None, jwt_secret: str
) -> Principal:
    """The caller behind a request's `authorization` or `x-api-key` header."""
    api_key_id = None
    if api_key:
        record = uow.session.scalar(select(ApiKey).where(ApiKey.key_hash == api_key_hash(api_key)))
        if record is None or record.revoked_at is not None:
            raise Unauthenticated("The API key is not valid.")
        if record.expires_at <= datetime.now(UTC):
            raise Unauthenticated("The API key has expired.")
        user_id = record.user_id
        api_key_id = record.id
    elif authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("The authorization header must be 'Bearer <token>'.")
        user_id = user_id_from_access_token(token.strip(), jwt_secret)
    else:
        raise Unauthenticated(
            "Authentication required: send 'Authorization: Bearer <token>' or 'X-API-KEY'."
        )
    user = uow.session.get(User, user_id)
    if user is None:
        raise Unauthenticated("The user behind these credentials no longer exists.")
    return Principal(user_id=user.id, email=user.email, role=Role(user.role), api_key_id=api_key_id)


def create_api_key(
    uow: UnitOfWork, principal: Principal, name: str, expires_in_days: int
) -> CreatedApiKey:
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise InvalidArgument("name", "must be 1 to 100 characters")
    if not 1 <= expires_in_days <= MAX_API_KEY_DAYS:
        raise InvalidArgument("expiresInDays", f"must be from 1 to {MAX_API_KEY_DAYS}")
    secret = new_api_key()
    record = ApiKey(
        user_id=principal.user_id,
        name=name,
        key_hash=api_key_hash(secret),
        created_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(days=expires_in_days),
    )
    uow.session.add(record)
    uow.session.flush()
    audit.record(
        uow,
        principal,
        audit.Action.API_KEY_CREATE,
        audit.Target.API_KEY,
        record.id,
        details={"name": name, "expiresAt": record.expires_at.isoformat()},
    )
    log.info("api key %s created for user %s", record.id, principal.user_id)
    return CreatedApiKey(record=record, secret=secret)


def list_api_keys(uow: UnitOfWork, principal: Principal) -> list[ApiKey]:
    return list(
        uow.session.scalars(
            select(ApiKey)
            .where(
                ApiKey.user_id == principal.user_id,
                ApiKey.revoked_at.is_(None),
                ApiKey.expires_at > datetime.now(UTC),
            )
            .order_by(ApiKey.created_at.desc())
        )
    )


def revoke_api_key(uow: UnitOfWork, principal: Principal, key_id: str) -> None:
    record = uow.session.get(ApiKey, key_id)
    if record is None or record.user_id != principal.user_id or record.revoked_at is not None:
        raise NotFound(f"API key {key_id} not found.")
    record.revoked_at = datetime.now(UTC)
    audit.record(
        uow,
        principal,
        audit.Action.API_KEY_REVOKE,
        audit.Target.API_KEY,
        key_id,
        details={"name": record.name},
    )
    log.info("api key %s revoked by user %s", key_id, principal.user_id)
