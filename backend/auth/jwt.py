"""Verifying the bearer tokens Better Auth frontends send.

Pure verification: no web framework, no database. Errors are this module's own; the web layer
turns `InvalidToken` into 401.

The header's `alg` picks the key family and each key verifies exactly one family (RFC 8725 §3.1):
the shared secret only HS256/384/512. Headers that would make a verifier fetch or trust keys named
by the token itself (`jku`, `x5u`, `jwk`, `x5c`) are refused, never followed.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# Token-supplied key locations and critical extensions we do not implement are refused outright.
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
MAX_TOKEN_BYTES = 8 * 1024
MAX_USER_ID_LENGTH = 255
# Where frontends put the user id, in order: their own tokens, then Better Auth's cookie cache.
FLAT_USER_ID_CLAIMS = ("sub", "user_id", "userId", "id")
NESTED_USER_ID_CLAIMS = (("session", "userId"), ("user", "id"))


class InvalidToken(Exception):
    """The token is malformed, forged, expired, not yet valid or names no user.

    The message is for logs and tests; it never reaches a client.
    """


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    user_id: str
    claims: Mapping[str, Any]


class TokenVerifier:
    """Verifies a compact JWS and returns who it names."""

    def __init__(
        self,
        *,
        secret: str,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: int = 30,
    ) -> None:
        # Better Auth and `jose` frontends HMAC with the UTF-8 bytes of the secret as written.
        self._hmac_key = secret.encode("utf-8")
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds

    async def verify(self, token: str) -> VerifiedToken:
        header = read_header(token)
        algorithm = header["alg"]
        if algorithm in HMAC_ALGORITHMS:
            claims = decode_claims(
                token,
                self._hmac_key,
                algorithm,
                issuer=self._issuer,
                audience=self._audience,
                leeway_seconds=self._leeway,
            )
        else:
            raise InvalidToken(f"algorithm {algorithm!r} is not accepted")
        return VerifiedToken(user_id=user_id_from_claims(claims), claims=claims)


def read_header(token: str) -> dict[str, Any]:
    """The token's protected header, checked before any key is chosen."""
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken("token is larger than 8 KiB")
    if token.count(".") != 2:
        raise InvalidToken("token is not a compact JWS")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as error:
        raise InvalidToken("token header is malformed") from error
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm.lower() == "none":
        raise InvalidToken("token has no usable algorithm")
    refused = FORBIDDEN_HEADERS.intersection(header)
    if refused:
        raise InvalidToken(f"token header carries refused parameters {sorted(refused)}")
    return header


def decode_claims(
    token: str,
    key: Any,
    algorithm: str,
    *,
    issuer: str | None,
    audience: str | None,
    leeway_seconds: int,
) -> dict[str, Any]:
    """Check the signature with `key` for exactly `algorithm`, then the registered claims."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            issuer=issuer,
            audience=audience,
            leeway=leeway_seconds,
            options={
                "require": ["exp"],
                "verify_aud": audience is not None,
                "verify_iss": issuer is not None,
            },
        )
    except (jwt.PyJWTError, ValueError, TypeError) as error:
        raise InvalidToken(f"token rejected: {type(error).__name__}") from error
    return claims


def user_id_from_claims(claims: Mapping[str, Any]) -> str:
    """The user the token names: `sub`, else the other claims frontends use."""
    for name in FLAT_USER_ID_CLAIMS:
        if name in claims:
            return _valid_user_id(claims[name])
    for outer, inner in NESTED_USER_ID_CLAIMS:
        container = claims.get(outer)
        if isinstance(container, Mapping) and inner in container:
            return _valid_user_id(container[inner])
    raise InvalidToken("token names no user")


def _valid_user_id(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidToken("token subject is empty or not a string")
    if len(value) > MAX_USER_ID_LENGTH:
        raise InvalidToken("token subject is too long")
    if not value.isprintable():
        raise InvalidToken("token subject contains control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidToken("token subject is not valid Unicode") from error
    return value
