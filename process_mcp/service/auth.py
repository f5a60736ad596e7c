"""Who is calling over HTTP: bearer tokens from a file, or OAuth 2.1 access tokens (JWTs) from an issuer.

Both verifiers implement the MCP SDK's ``TokenVerifier`` and name the caller's principal in
``AccessToken.client_id``; the tools find the caller's space from it. A request without a valid token
never reaches a tool: the SDK's middleware answers 401 with ``WWW-Authenticate``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import stat
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import anyio
import jwt
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken, TokenVerifier
from starlette.authentication import BaseUser

from ..config import ServiceConfig
from ..errors import InvalidConfig, excerpt

logger = logging.getLogger(__name__)

PRINCIPAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
"""A principal's name becomes a directory and a container name, so it is kept to what both allow."""

MIN_TOKEN_LENGTH = 16
"""Shorter tokens are guessable; the file is refused rather than served with one."""

ASYMMETRIC_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
"""JWT algorithms accepted: signatures only the issuer can make (never ``none`` or a shared HMAC secret)."""

CLOCK_SKEW_S = 30
"""Leeway on a JWT's exp and nbf for clocks that disagree a little."""

JWKS_CACHE_S = 300
"""How long keys fetched from a JWKS URL are used before they are fetched again."""

JWKS_FETCH_TIMEOUT_S = 10
"""Bound on fetching the issuer's keys."""


REFUSAL_LOG_BURST = 20
"""Refused requests logged one line each per window; more are counted and summed up in one line."""

REFUSAL_LOG_WINDOW_S = 60.0
"""The window of ``REFUSAL_LOG_BURST``: a flood of bad tokens cannot fill the log."""

refusal: ContextVar[str | None] = ContextVar("refusal", default=None)
"""Why the verifier refused the token of the request being authenticated (never the token itself)."""


class RefusalLog:
    """Logs why requests were refused authentication: the client, the reason, and a hint to who it was
    (a short fingerprint of the token; a JWT's unverified subject), never the token; at most
    ``REFUSAL_LOG_BURST`` lines per window, and then how many more there were."""

    def __init__(self) -> None:
        self._window_start = -REFUSAL_LOG_WINDOW_S
        self._logged = 0
        self._unlogged = 0

    def refused(self, client: str, path: str, authorization: str | None) -> None:
        now = time.monotonic()
        if now - self._window_start >= REFUSAL_LOG_WINDOW_S:
            if self._unlogged:
                logger.warning("%d more requests were refused authentication and not logged", self._unlogged)
            self._window_start, self._logged, self._unlogged = now, 0, 0
        if self._logged >= REFUSAL_LOG_BURST:
            self._unlogged += 1
            return
        self._logged += 1
        logger.warning("refused a request from %s to %s: %s", client, path, why_refused(authorization))


def why_refused(authorization: str | None) -> str:
    """The reason a request with this Authorization header was refused, with a hint to who sent it."""
    if authorization is None:
        return "no Authorization header"
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return f"the Authorization header is not a bearer token (scheme {excerpt(scheme)})"
    token = token.strip()
    fingerprint = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    hint = f"token sha256:{fingerprint}"
    subject = _unverified_subject(token)
    if subject is not None:
        hint += f", claiming subject {excerpt(subject)}"
    return f"{refusal.get() or 'the bearer token was not accepted'} ({hint})"


def _unverified_subject(token: str) -> str | None:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError):
        return None
    subject = claims.get("sub")
    return str(subject) if subject is not None else None


class TokenFileVerifier(TokenVerifier):
    """Static bearer tokens, one ``principal token`` per line of a file only its owner may change.

    Every token is compared (in constant time, on digests of equal length) on every request, so
    neither which token matched nor how much of it did shows in the response time.
    """

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self._entries = [(principal, hashlib.sha256(token.encode()).digest()) for principal, token in entries]

    @property
    def principals(self) -> set[str]:
        return {principal for principal, _ in self._entries}

    async def verify_token(self, token: str) -> AccessToken | None:
        found = self._principal_of(token)
        if found is None:
            refusal.set("no principal in the tokens file has this token")
            return None
        return AccessToken(token=token, client_id=found, scopes=[], subject=found)

    def issued(self, token: str) -> bool:
        """Whether ``token`` is one of the file's (any principal's)."""
        return self._principal_of(token) is not None

    def _principal_of(self, token: str) -> str | None:
        offered = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for principal, digest in self._entries:
            if hmac.compare_digest(offered, digest) and found is None:
                found = principal
        return found


def read_tokens_file(path: str) -> list[tuple[str, str]]:
    """The (principal, token) pairs of ``path``. Raises InvalidConfig if the file can be read or changed by
    others (as ssh refuses such keys), if it belongs to another user, or if a line is malformed."""
    where = f"PROCESS_AUTH_TOKENS_FILE {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise InvalidConfig(f"{where}: cannot open it ({exc.strerror})") from None
    with os.fdopen(fd, encoding="utf-8") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InvalidConfig(f"{where}: not a regular file")
        if info.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
            raise InvalidConfig(
                f"{where}: permissions {stat.filemode(info.st_mode)} let others read or change the tokens; "
                f"run chmod 600 {path}"
            )
        if info.st_uid not in (os.getuid(), 0):
            raise InvalidConfig(f"{where}: owned by uid {info.st_uid}; it must belong to the server's user or root")
        try:
            text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidConfig(f"{where}: cannot read it ({exc})") from None
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise InvalidConfig(f"{where} line {number}: expected 'principal token'")
        principal, token = fields
        if not PRINCIPAL_NAME.match(principal):
            raise InvalidConfig(
                f"{where} line {number}: principal {principal!r} must be 1-48 letters, digits, '.', '_' or '-'"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise InvalidConfig(
                f"{where} line {number}: the token is shorter than {MIN_TOKEN_LENGTH} characters; "
                "make one with: openssl rand -hex 32"
            )
        if token in seen:
            raise InvalidConfig(f"{where} line {number}: this token is already given to another line")
        seen.add(token)
        entries.append((principal, token))
    if not entries:
        raise InvalidConfig(f"{where}: no 'principal token' lines")
    return entries


class JwtVerifier(TokenVerifier):
    """OAuth 2.1 resource server: JWT access tokens signed by the issuer's keys, for this server.

    A token is accepted when its signature verifies against the JWKS, ``iss`` is the issuer, ``aud``
    names the audience (this server's URL), it has not expired, and it carries every required scope
    (``scope``, space-separated, or ``scp``). The principal is the token's subject.
    """

    def __init__(self, issuer: str, audience: str, jwks: str, scopes: list[str]) -> None:
        self.issuer = issuer
        self.audience = audience
        self.scopes = scopes
        self._client: jwt.PyJWKClient | None = None
        self._keys: jwt.PyJWKSet | None = None
        if jwks.startswith(("https://", "http://")):
            self._client = jwt.PyJWKClient(jwks, cache_keys=True, lifespan=JWKS_CACHE_S, timeout=JWKS_FETCH_TIMEOUT_S)
        else:
            self._keys = _read_jwks(jwks)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            key = await self._signing_key(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=ASYMMETRIC_ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                leeway=CLOCK_SKEW_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, ValueError) as exc:
            refusal.set(f"the JWT was refused: {excerpt(str(exc))}")
            return None
        granted = _scopes(claims)
        missing = [scope for scope in self.scopes if scope not in granted]
        if missing:
            refusal.set(f"the JWT lacks the scopes {', '.join(missing)}")
            return None
        subject = str(claims["sub"])
        return AccessToken(
            token=token,
            client_id=principal_for_subject(self.issuer, subject),
            scopes=granted,
            expires_at=int(claims["exp"]),
            resource=self.audience,
            subject=subject,
            claims=claims,
        )

    def issued(self, token: str) -> bool:
        """Whether ``token`` is a JWT of this server's issuer or for its audience, valid or not (expired,
        another scope): a credential of the caller's, which no box may be handed."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):  # whatever a crafted token is
            return False
        if not isinstance(claims, dict):
            return False
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        return str(claims.get("iss", "")).rstrip("/") == self.issuer.rstrip("/") or self.audience in audiences

    async def _signing_key(self, token: str) -> Any:
        if self._keys is not None:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            for key in self._keys.keys:
                if kid is None or key.key_id == kid:
                    return key
            raise jwt.InvalidKeyError(f"no key {kid!r} in the JWKS")
        assert self._client is not None
        client = self._client
        with anyio.fail_after(JWKS_FETCH_TIMEOUT_S + 1):
            return await anyio.to_thread.run_sync(client.get_signing_key_from_jwt, token)


def principal_for_subject(issuer: str, subject: str) -> str:
    """A principal name for an OAuth subject: readable where the subject is, and unique per (issuer,
    subject), since a subject is only unique within its issuer."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", subject).strip("-.")[:32] or "subject"
    digest = hashlib.sha256(f"{issuer}\0{subject}".encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


def _scopes(claims: dict[str, Any]) -> list[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return scope.split()
    scp = claims.get("scp")
    if isinstance(scp, list):
        return [str(item) for item in scp]
    return []


def _read_jwks(path: str) -> jwt.PyJWKSet:
    try:
        with open(path, encoding="utf-8") as file:
            return jwt.PyJWKSet.from_dict(json.load(file))
    except (OSError, ValueError, jwt.PyJWTError) as exc:
        raise InvalidConfig(f"PROCESS_AUTH_JWKS {path}: not a readable JWKS ({exc})") from None


def make_verifier(service: ServiceConfig) -> TokenVerifier | None:
    """The verifier for the configured authentication, or None for ``PROCESS_AUTH=none``. Raises
    InvalidConfig when the settings are incomplete or unsafe, saying what to set."""
    mode = service.auth_mode
    if mode == "none":
        return None
    if mode == "tokens":
        if service.tokens_file is None:
            raise InvalidConfig("PROCESS_AUTH=tokens needs PROCESS_AUTH_TOKENS_FILE")
        verifier = TokenFileVerifier(read_tokens_file(service.tokens_file))
        logger.info("bearer tokens for %d principals from %s", len(verifier.principals), service.tokens_file)
        return verifier
    if mode == "oauth":
        issuer, audience, jwks = service.issuer, service.audience, service.jwks
        if not (issuer and audience and jwks):
            missing = [
                name
                for name, value in (
                    ("PROCESS_AUTH_ISSUER", issuer),
                    ("PROCESS_AUTH_AUDIENCE", audience),
                    ("PROCESS_AUTH_JWKS", jwks),
                )
                if not value
            ]
            raise InvalidConfig(
                f"OAuth needs {', '.join(missing)} (the audience is this server's URL, e.g. "
                "https://box.example.com/mcp)"
            )
        logger.info("OAuth access tokens from %s for %s", issuer, audience)
        return JwtVerifier(issuer, audience, jwks, service.scopes)
    raise InvalidConfig(
        "HTTP needs authentication: set PROCESS_AUTH_TOKENS_FILE (lines of 'principal token'), or "
        "PROCESS_AUTH_ISSUER, PROCESS_AUTH_AUDIENCE and PROCESS_AUTH_JWKS for OAuth; or PROCESS_AUTH=none "
        "with a loopback PROCESS_HTTP_HOST"
    )


def principal_of(scope: Mapping[str, Any]) -> str | None:
    """Who is calling, from an HTTP request's scope: the principal of its bearer token, or the user an
    application's own authentication put on it; None for the local caller (no authentication)."""
    user = scope.get("user")
    if isinstance(user, AuthenticatedUser):
        return user.access_token.client_id
    if isinstance(user, BaseUser) and user.is_authenticated:
        return user.display_name
    return None
