"""Verifying the bearer tokens Better Auth frontends send.

No web framework, no database. Errors are this module's own: the web layer turns `InvalidToken`
into 401 and `VerificationUnavailable` into 503.

Four kinds of token are accepted (CONTRACT.md, "Tokens the backend must accept"):
- HS256/384/512 JWTs signed with `BETTER_AUTH_SECRET` (the frontends' own, and Better Auth's
  cookie-cache JWT);
- Better Auth JWT plugin tokens (EdDSA by default; ES*, RS*, PS*) checked against its JWKS;
- opaque Better Auth session tokens, when session lookup is turned on.

The header's `alg` picks the key family and each key verifies exactly one family (RFC 8725 §3.1):
the shared secret only HS*, a JWKS key only the algorithm it declares (or its key type implies).
Headers that would make a verifier fetch or trust keys named by the token itself (`jku`, `x5u`,
`jwk`, `x5c`) are refused, never followed.

A JWT is decoded once (`parse_token`), its signature checked by PyJWT's algorithm objects with
keys prepared once (`signature_key`, `verify_signature`), its claims as PyJWT checks them and
stricter (`check_claims`): `jwt.decode` parsed every token three times and re-validated the
secret on each, about 116 µs against 31 µs for a token not seen before.
"""

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson

# The frontend chooses the secret; a warning on every HS384/HS512 token would only put its
# length in the logs.
warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)

logger = logging.getLogger("todo.auth")

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS_BY_CURVE = {
    "P-256": frozenset({"ES256"}),
    "P-384": frozenset({"ES384"}),
    "P-521": frozenset({"ES512"}),
}
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | {"ES256", "ES384", "ES512", "EdDSA"}
MAX_JWKS_BYTES = 256 * 1024
MAX_OPAQUE_TOKEN_LENGTH = 512
# Verified JWTs kept per worker: a repeat costs a dict lookup instead of a signature check.
VERIFIED_CACHE_SIZE = 10_000
VERIFIED_CACHE_SECONDS = 60
# Token-supplied key locations and critical extensions we do not implement are refused outright.
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
MAX_TOKEN_BYTES = 8 * 1024
TIME_CLAIMS = ("exp", "nbf", "iat")
BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
# PyJWT's signature algorithms, used directly: the token is parsed once here, and the keys are
# prepared once (`signature_key`) instead of on every token.
SIGNATURE_ALGORITHMS = {
    name: jwt.get_algorithm_by_name(name)
    for name in sorted(HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS)
}
MAX_USER_ID_LENGTH = 255
# Where frontends put the user id, in order: their own tokens, then Better Auth's cookie cache.
FLAT_USER_ID_CLAIMS = ("sub", "user_id", "userId", "id")
NESTED_USER_ID_CLAIMS = (("session", "userId"), ("user", "id"))


class InvalidToken(Exception):
    """The token is malformed, forged, expired, not yet valid or names no user.

    The message is for logs and tests; it never reaches a client.
    """


class VerificationUnavailable(Exception):
    """Better Auth's JWKS or session endpoint, needed to check this token, is unreachable."""


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    user_id: str
    claims: Mapping[str, Any]


class TokenVerifier:
    """Verifies a bearer token and returns who it names."""

    def __init__(
        self,
        *,
        secret: str,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: int = 30,
        jwks: "JWKSCache | None" = None,
        jwks_issuer: str | None = None,
        jwks_audience: str | None = None,
        sessions: "SessionLookup | None" = None,
    ) -> None:
        # Better Auth and `jose` frontends HMAC with the UTF-8 bytes of the secret as written.
        # Prepared once; a secret PyJWT refuses as an HMAC key (it looks like a public key)
        # verifies no token.
        self._hmac_keys: dict[str, Any] = {}
        for algorithm in HMAC_ALGORITHMS:
            with contextlib.suppress(InvalidToken):
                self._hmac_keys[algorithm] = signature_key(algorithm, secret.encode("utf-8"))
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._jwks = jwks
        self._jwks_issuer = jwks_issuer
        self._jwks_audience = jwks_audience
        self._sessions = sessions
        # token -> (result, valid until (epoch seconds), JWKS generation it was checked under)
        self._verified: dict[str, tuple[VerifiedToken, float, int]] = {}

    async def verify(self, token: str) -> VerifiedToken:
        """Who the token names. A JWT verified before is answered from memory until its `exp`
        (at most VERIFIED_CACHE_SECONDS, and never past a change of Better Auth's keys)."""
        cached = self._verified.get(token)
        if cached is not None:
            verified, valid_until, key_generation = cached
            if time.time() < valid_until and key_generation == self._key_generation():
                return verified
            del self._verified[token]
        verified = await self._verify(token)
        expires = verified.claims.get("exp")
        if isinstance(expires, int | float):
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                del self._verified[next(iter(self._verified))]
            valid_until = min(expires, time.time() + VERIFIED_CACHE_SECONDS)
            self._verified[token] = (verified, valid_until, self._key_generation())
        return verified

    def _key_generation(self) -> int:
        return self._jwks.generation if self._jwks is not None else 0

    async def _verify(self, token: str) -> VerifiedToken:
        if token.count(".") != 2:
            if self._sessions is not None:
                return VerifiedToken(user_id=await self._sessions.user_id_for(token), claims={})
            raise InvalidToken("token is not a compact JWS")
        parsed = parse_token(token)
        algorithm = parsed.header["alg"]
        if algorithm in HMAC_ALGORITHMS:
            if algorithm not in self._hmac_keys:
                raise InvalidToken("the secret cannot verify HMAC tokens")
            verify_signature(parsed, self._hmac_keys[algorithm])
            check_claims(
                parsed.claims,
                issuer=self._issuer,
                audience=self._audience,
                leeway_seconds=self._leeway,
            )
        elif algorithm in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
            # Claims first, unverified: a token that would be refused anyway is refused without
            # asking Better Auth for keys, and so never depends on it being reachable.
            check_claims(
                parsed.claims,
                issuer=self._jwks_issuer,
                audience=self._jwks_audience,
                leeway_seconds=self._leeway,
            )
            user_id_from_claims(parsed.claims)
            key = await self._jwks.key_for(parsed.header.get("kid"), algorithm)
            verify_signature(parsed, key)
            # Again after the wait for Better Auth's keys (up to a fetch timeout plus a
            # cool-down): a token that expired meanwhile is refused.
            check_claims(
                parsed.claims,
                issuer=self._jwks_issuer,
                audience=self._jwks_audience,
                leeway_seconds=self._leeway,
            )
        else:
            raise InvalidToken(f"algorithm {algorithm[:16]!r} is not accepted")
        return VerifiedToken(user_id=user_id_from_claims(parsed.claims), claims=parsed.claims)


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A compact JWS taken apart, nothing in it trusted until `verify_signature` has passed."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def parse_token(token: str) -> ParsedToken:
    """The token's three segments, each decoded once and checked before any key is chosen:
    at most 8 KiB; canonical base64url without padding; header and claims JSON objects that
    name no member twice; a usable `alg`; none of the refused header parameters."""
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken("token is larger than 8 KiB")
    if token.count(".") != 2:
        raise InvalidToken("token is not a compact JWS")
    if "=" in token:
        # Compact JWS omits base64 padding (RFC 7515 §2); a padded copy is not the token issued.
        raise InvalidToken("token carries base64 padding")
    header_segment, payload_segment, signature_segment = token.split(".")
    header = _json_object(_base64url(header_segment))
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm.lower() == "none":
        raise InvalidToken("token has no usable algorithm")
    refused = FORBIDDEN_HEADERS.intersection(header)
    if refused:
        raise InvalidToken(f"token header carries refused parameters {sorted(refused)}")
    if not isinstance(header.get("kid", ""), str):
        raise InvalidToken("token kid is not a string")
    if header.get("b64", True) is not True:
        raise InvalidToken("token payload is not base64url (RFC 7797)")
    return ParsedToken(
        header=header,
        claims=_json_object(_base64url(payload_segment)),
        signing_input=f"{header_segment}.{payload_segment}".encode("ascii"),
        signature=_base64url(signature_segment),
    )


def verify_signature(parsed: ParsedToken, key: Any) -> None:
    """Check the signature with `key` (prepared by `signature_key`) for the header's `alg`."""
    algorithm = SIGNATURE_ALGORITHMS[parsed.header["alg"]]
    try:
        valid = algorithm.verify(parsed.signing_input, key, parsed.signature)
    except (jwt.PyJWTError, ValueError, TypeError) as error:
        raise InvalidToken(f"token signature check failed: {type(error).__name__}") from error
    if not valid:
        raise InvalidToken("token signature does not match")


def signature_key(algorithm: str, key: Any) -> Any:
    """The key as `verify_signature` takes it for `algorithm`: PyJWT's checks (an HMAC secret
    that is not a public key, an asymmetric key of the algorithm's type), made once per key."""
    try:
        return SIGNATURE_ALGORITHMS[algorithm].prepare_key(key)
    except (jwt.PyJWTError, ValueError, TypeError) as error:
        raise InvalidToken(f"key does not fit {algorithm}: {type(error).__name__}") from error


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str | None,
    audience: str | None,
    leeway_seconds: int,
) -> None:
    """The registered claims, as PyJWT checks them (RFC 7519 §4.1) and stricter: `exp` required,
    time claims JSON numbers (not strings, booleans or non-finite), `iss` and `aud` checked when
    configured, `sub` and `jti` strings when present."""
    for name in TIME_CLAIMS:
        if name in claims:
            value = claims[name]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (isinstance(value, float) and not math.isfinite(value))
            ):
                raise InvalidToken(f"token {name} is not a number")
    if claims.get("exp") is None:
        raise InvalidToken("token has no exp")
    now = time.time()
    if int(claims["exp"]) <= now - leeway_seconds:
        raise InvalidToken("token has expired")
    for name in ("nbf", "iat"):
        if name in claims and int(claims[name]) > now + leeway_seconds:
            raise InvalidToken(f"token is not yet valid ({name})")
    if issuer is not None and claims.get("iss") != issuer:
        raise InvalidToken("token issuer does not match")
    if audience is not None:
        audiences = claims.get("aud")
        if isinstance(audiences, str):
            audiences = [audiences]
        if (
            not isinstance(audiences, list)
            or not all(isinstance(name, str) for name in audiences)
            or audience not in audiences
        ):
            raise InvalidToken("token audience does not match")
    for name in ("sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise InvalidToken(f"token {name} is not a string")


def _base64url(segment: str) -> bytes:
    """A segment's bytes: base64url alphabet only, and canonical (no stray bits), so that one
    token has one spelling."""
    if len(segment) % 4 == 1 or BASE64URL.fullmatch(segment) is None:
        raise InvalidToken("token segment is not base64url")
    decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != segment.encode("ascii"):
        raise InvalidToken("token segment is not canonical base64url")
    return decoded


def _json_object(data: bytes) -> dict[str, Any]:
    """A JSON object; one naming a member twice reads differently to different parsers, so it is
    refused."""
    try:
        value = json.loads(data, object_pairs_hook=_unique_members)
    except InvalidToken:
        raise
    except (ValueError, RecursionError) as error:
        raise InvalidToken("token segment is not JSON") from error
    if not isinstance(value, dict):
        raise InvalidToken("token segment is not a JSON object")
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise InvalidToken("token JSON names a member twice")
    return members


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


def algorithms_for_jwk(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The signature algorithms a published key may verify: the one it declares, else the ones
    its key type implies. Symmetric (`oct`) and encryption keys verify nothing."""
    if jwk.get("use", "sig") != "sig":
        return frozenset()
    implied: frozenset[str] = frozenset()
    key_type = jwk.get("kty")
    if key_type == "RSA":
        implied = RSA_ALGORITHMS
    elif key_type == "EC":
        implied = EC_ALGORITHMS_BY_CURVE.get(str(jwk.get("crv")), frozenset())
    elif key_type == "OKP" and jwk.get("crv") == "Ed25519":
        implied = frozenset({"EdDSA"})
    declared = jwk.get("alg")
    if declared is None:
        return implied
    return implied & {declared}


@dataclass(frozen=True, slots=True)
class PublishedKey:
    kid: str | None
    algorithms: frozenset[str]
    jwk: Mapping[str, Any]


class JWKSCache:
    """Better Auth's public keys, fetched without blocking the event loop and kept in memory.

    - Fetched on first use; refreshed in the background once older than `max_age_seconds`.
    - A token with an unknown `kid` (Better Auth restarted or rotated its key) triggers one refresh,
      at most one per `refresh_cooldown_seconds` however many such tokens arrive, so random `kid`s
      cannot make the backend hammer Better Auth.
    - Unreachable with nothing cached: `VerificationUnavailable` within `timeout_seconds`; after a
      failed attempt, further requests fail at once until the cool-down has passed. Requests that
      arrive while a fetch is under way wait for it (a page load sends several at once).
    """

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        *,
        timeout_seconds: float = 2.5,
        refresh_cooldown_seconds: float = 2.0,
        max_age_seconds: float = 600.0,
    ) -> None:
        self.url = url
        self._http = http
        self._timeout = timeout_seconds
        self._cooldown = refresh_cooldown_seconds
        self._max_age = max_age_seconds
        self._keys: list[PublishedKey] | None = None
        self._key_objects: dict[tuple[str | None, str], Any] = {}
        self._fetched_at = 0.0
        self._last_attempt = -float("inf")  # when the latest fetch started
        self._attempt_ended = -float("inf")  # when the latest fetch ended, keys or not
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self.fetch_count = 0
        # Bumped whenever the published keys change, so verified tokens are checked again.
        self.generation = 0

    async def key_for(self, kid: object, algorithm: str) -> Any:
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("token kid is not a string")
        if self._keys is None:
            # With no keys, an attempt that has ended failed. One under way is waited for.
            if time.monotonic() - self._attempt_ended < self._cooldown:
                raise VerificationUnavailable("JWKS unreachable (recent attempt failed)")
            await self._refresh(wait_for_cooldown=False)
        elif time.monotonic() - self._fetched_at > self._max_age:
            self._refresh_in_background()
        key = self._find(kid, algorithm)
        if key is None and kid is not None and not self._knows(kid):
            # Perhaps Better Auth has a new key since we last looked.
            await self._refresh(wait_for_cooldown=True)
            key = self._find(kid, algorithm)
        if key is None:
            raise InvalidToken("no published key verifies this token")
        return key

    def _knows(self, kid: str) -> bool:
        return any(published.kid == kid for published in self._keys or [])

    def _find(self, kid: str | None, algorithm: str) -> Any:
        candidates = [
            published
            for published in self._keys or []
            if algorithm in published.algorithms and (kid is None or published.kid == kid)
        ]
        if len(candidates) != 1:
            return None
        cache_key = (candidates[0].kid, algorithm)
        if cache_key not in self._key_objects:
            try:
                key = signature_key(algorithm, jwt.PyJWK(dict(candidates[0].jwk), algorithm).key)
            except (InvalidToken, jwt.PyJWTError, TypeError, ValueError):
                return None  # a malformed published key verifies nothing
            if not callable(getattr(key, "verify", None)):
                return None  # a private key published by mistake is not used
            self._key_objects[cache_key] = key
        return self._key_objects[cache_key]

    def _refresh_in_background(self) -> None:
        if time.monotonic() - self._last_attempt < self._cooldown:
            return  # a recent attempt failed or is running: keep serving the keys we have
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._refresh(wait_for_cooldown=False))

    async def _refresh(self, *, wait_for_cooldown: bool) -> None:
        requested_at = time.monotonic()
        async with self._lock:
            if self._attempt_ended >= requested_at:
                # A fetch ended while this request waited for the lock: its answer is as fresh
                # as this request needs.
                if self._keys is None:
                    raise VerificationUnavailable("JWKS unreachable")
                return
            if wait_for_cooldown:
                remaining = self._last_attempt + self._cooldown - time.monotonic()
                if remaining > 0:
                    await asyncio.sleep(remaining)
            self._last_attempt = time.monotonic()
            try:
                keys = await self._fetch()
            except VerificationUnavailable:
                self._attempt_ended = time.monotonic()
                if self._keys is None or wait_for_cooldown:
                    raise
                logger.warning("JWKS refresh failed; keeping the keys fetched before")
                return
            if self._keys is not None and keys != self._keys:
                self.generation += 1
            self._keys = keys
            self._key_objects.clear()
            self._fetched_at = self._attempt_ended = time.monotonic()

    async def _fetch(self) -> list[PublishedKey]:
        self.fetch_count += 1
        try:
            async with asyncio.timeout(self._timeout):
                async with self._http.stream("GET", self.url) as response:
                    if response.status_code != 200:
                        raise VerificationUnavailable(f"JWKS answered {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise VerificationUnavailable("JWKS document is too large")
        except (httpx.HTTPError, TimeoutError, OSError) as error:
            logger.warning("JWKS fetch failed: %s", type(error).__name__)
            raise VerificationUnavailable("JWKS unreachable") from None
        return parse_jwks(bytes(body))


def parse_jwks(document: bytes) -> list[PublishedKey]:
    """The usable signature keys of a JWKS document; anything else in it is ignored."""
    try:
        parsed = orjson.loads(document)
    except orjson.JSONDecodeError:
        raise VerificationUnavailable("JWKS document is not JSON") from None
    entries = parsed.get("keys") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        raise VerificationUnavailable("JWKS document has no key list")
    keys = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        try:
            algorithms = algorithms_for_jwk(entry)
        except TypeError:  # e.g. an "alg" that is not a string
            continue
        kid = entry.get("kid")
        if algorithms and (kid is None or isinstance(kid, str)):
            keys.append(PublishedKey(kid=kid, algorithms=algorithms, jwk=entry))
    return keys


class SessionLookup:
    """Opaque Better Auth session tokens (bearer plugin), asked of Better Auth's `get-session`.

    Answers are cached for `cache_seconds` (a signed-out session keeps working that long); a "no
    session" answer for a few seconds, so a retried bad token does not reach Better Auth each time.
    """

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        *,
        timeout_seconds: float = 2.5,
        cache_seconds: float = 30.0,
        negative_cache_seconds: float = 5.0,
        max_entries: int = 10_000,
    ) -> None:
        self.url = url
        self._http = http
        self._timeout = timeout_seconds
        self._ttl = cache_seconds
        self._negative_ttl = negative_cache_seconds
        self._max_entries = max_entries
        # sha256(token) -> (user id or None for "no session", expiry on the monotonic clock)
        self._answers: OrderedDict[bytes, tuple[str | None, float]] = OrderedDict()

    async def user_id_for(self, token: str) -> str:
        if not token or len(token) > MAX_OPAQUE_TOKEN_LENGTH or not _is_token_text(token):
            raise InvalidToken("not a session token")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._answers.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            if cached[0] is None:
                raise InvalidToken("no session (cached)")
            return cached[0]
        user_id = await self._ask(token)
        self._remember(digest, user_id)
        if user_id is None:
            raise InvalidToken("Better Auth knows no such session")
        return user_id

    async def _ask(self, token: str) -> str | None:
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._http.get(
                    self.url, headers={"Authorization": f"Bearer {token}"}
                )
        except (httpx.HTTPError, TimeoutError, OSError) as error:
            logger.warning("session lookup failed: %s", type(error).__name__)
            raise VerificationUnavailable("Better Auth unreachable") from None
        if response.status_code in {401, 403, 404}:
            return None
        if response.status_code != 200:
            raise VerificationUnavailable(f"get-session answered {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            raise VerificationUnavailable(
                "get-session answered something other than JSON"
            ) from None
        user = answer.get("user") if isinstance(answer, dict) else None
        if not isinstance(user, dict):
            return None
        return _valid_user_id(user.get("id"))

    def _remember(self, digest: bytes, user_id: str | None) -> None:
        lifetime = self._ttl if user_id is not None else self._negative_ttl
        self._answers[digest] = (user_id, time.monotonic() + lifetime)
        self._answers.move_to_end(digest)
        while len(self._answers) > self._max_entries:
            self._answers.popitem(last=False)


def _is_token_text(token: str) -> bool:
    # What an HTTP header can carry; anything else is not a session token.
    return token.isascii() and token.isprintable() and " " not in token
