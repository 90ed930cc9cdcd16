"""Authentication and authorization: who may call which route, with real signed tokens.

Every token here is really signed (PyJWT, or by hand where PyJWT refuses to build the forgery).
CONTRACT.md "Tokens the backend must accept" and "Errors": 401 before 403 before 404 and 422.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient

from auth.jwt import (
    MAX_TOKEN_BYTES,
    InvalidToken,
    TokenVerifier,
    check_claims,
    parse_token,
    user_id_from_claims,
)
from errors import InvalidCredentials, NotAuthenticated, WrongUser
from main import create_app
from tests.support import ALICE, BOB, TEST_SECRET, auth, make_settings, make_token

OTHER_SECRET = "another-secret-9876543210-zyxwvutsrqponmlkjihgfedcba"
ISSUER = "http://127.0.0.1:3000"
AUDIENCE = "todo-api"


# --- helpers -------------------------------------------------------------------------------------


def tasks_url(user_id: str = ALICE, suffix: str = "") -> str:
    return f"/api/{user_id}/tasks{suffix}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def standard_claims(user_id: str = ALICE, lifetime: int = 600) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user_id, "iat": now, "exp": now + lifetime}


def unsigned_token(header: dict[str, Any], payload: dict[str, Any]) -> str:
    """`alg: none` style: the signature part is empty."""
    return f"{b64url_json(header)}.{b64url_json(payload)}."


def hmac_signed_token(header: dict[str, Any], payload: object, secret: str = TEST_SECRET) -> str:
    """A token whose HMAC-SHA256 signature is valid whatever the header claims."""
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    signature = hmac.new(secret.encode("utf-8"), signing_input.encode("ascii"), hashlib.sha256)
    return f"{signing_input}.{b64url(signature.digest())}"


def padded_token(padding: int) -> str:
    """A valid token for ALICE with an extra claim of `padding` characters."""
    return make_token(ALICE, pad="x" * padding)


def largest_token_within(limit: int) -> str:
    """The longest padded token of at most `limit` characters (length grows with the padding)."""
    shortest, longest = 0, limit
    while shortest < longest:
        middle = (shortest + longest + 1) // 2
        if len(padded_token(middle)) <= limit:
            shortest = middle
        else:
            longest = middle - 1
    return padded_token(shortest)


def tampered(token: str) -> str:
    """The token with the first character of its signature changed."""
    signing_input, signature = token.rsplit(".", 1)
    replacement = "B" if signature[0] == "A" else "A"
    return f"{signing_input}.{replacement}{signature[1:]}"


def assert_not_authenticated(response: httpx.Response) -> None:
    """No usable credentials were sent: 401, the Bearer challenge and a `detail` sentence."""
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json() == {"detail": NotAuthenticated.detail}


def assert_invalid_token(response: httpx.Response) -> None:
    """A token was sent and refused: 401, the Bearer challenge and a `detail` sentence."""
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json() == {"detail": InvalidCredentials.detail}
    assert isinstance(response.json()["detail"], str)


def assert_wrong_user(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json() == {"detail": WrongUser.detail}


async def create_task(client: AsyncClient, owner: str = ALICE, title: str = "Buy milk") -> int:
    response = await client.post(tasks_url(owner), json={"title": title}, headers=auth(owner))
    assert response.status_code == 201, response.text
    task_id: int = response.json()["id"]
    return task_id


async def list_as_owner(client: AsyncClient, owner: str = ALICE) -> list[dict[str, Any]]:
    response = await client.get(tasks_url(owner), headers=auth(owner))
    assert response.status_code == 200, response.text
    tasks: list[dict[str, Any]] = response.json()
    return tasks


# --- the seven routes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str
    suffix: str  # "{task_id}" is replaced by a real task's id
    body: dict[str, Any] | None
    success: int

    @property
    def takes_task_id(self) -> bool:
        return "{task_id}" in self.suffix

    @property
    def takes_body(self) -> bool:
        return self.method in {"POST", "PUT", "PATCH"}

    def url(self, user_id: str, task_id: int | str) -> str:
        return tasks_url(user_id, self.suffix.format(task_id=task_id))

    async def call(
        self,
        client: AsyncClient,
        *,
        user_id: str = ALICE,
        task_id: int | str = 0,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        request_headers = dict(headers or {})
        if content is None and self.body is not None:
            content = json.dumps(self.body).encode()
        if content is not None:
            request_headers["Content-Type"] = "application/json"
        return await client.request(
            self.method, self.url(user_id, task_id), content=content, headers=request_headers
        )


ROUTES = {
    "list": Endpoint("GET", "", None, 200),
    "create": Endpoint("POST", "", {"title": "New task"}, 201),
    "read": Endpoint("GET", "/{task_id}", None, 200),
    "put": Endpoint("PUT", "/{task_id}", {"title": "Changed"}, 200),
    "patch": Endpoint("PATCH", "/{task_id}", {"title": "Changed"}, 200),
    "complete": Endpoint("PATCH", "/{task_id}/complete", None, 200),
    "delete": Endpoint("DELETE", "/{task_id}", None, 204),
}
ENDPOINTS = [pytest.param(endpoint, id=name) for name, endpoint in ROUTES.items()]
TASK_ENDPOINTS = [
    pytest.param(endpoint, id=name) for name, endpoint in ROUTES.items() if endpoint.takes_task_id
]
BODY_ENDPOINTS = [
    pytest.param(endpoint, id=name) for name, endpoint in ROUTES.items() if endpoint.takes_body
]


async def assert_nothing_changed(
    client: AsyncClient, before: list[dict[str, Any]], owner: str = ALICE
) -> None:
    assert await list_as_owner(client, owner) == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_each_route_succeeds_with_the_owners_token(
    client: AsyncClient, endpoint: Endpoint
) -> None:
    task_id = await create_task(client)
    response = await endpoint.call(client, task_id=task_id, headers=auth(ALICE))
    assert response.status_code == endpoint.success, response.text


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_each_route_without_authorization_is_401(
    client: AsyncClient, endpoint: Endpoint
) -> None:
    task_id = await create_task(client)
    before = await list_as_owner(client)
    response = await endpoint.call(client, task_id=task_id)
    assert_not_authenticated(response)
    await assert_nothing_changed(client, before)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(
    "token",
    [
        pytest.param("not-a-jwt", id="garbage"),
        pytest.param(make_token(ALICE, secret=OTHER_SECRET), id="wrong-secret"),
        pytest.param(make_token(ALICE, lifetime=-120), id="expired"),
    ],
)
async def test_each_route_with_a_bad_token_is_401(
    client: AsyncClient, endpoint: Endpoint, token: str
) -> None:
    task_id = await create_task(client)
    before = await list_as_owner(client)
    response = await endpoint.call(client, task_id=task_id, headers=bearer(token))
    assert_invalid_token(response)
    await assert_nothing_changed(client, before)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_each_route_with_another_users_token_on_this_path_is_403(
    client: AsyncClient, endpoint: Endpoint
) -> None:
    task_id = await create_task(client, ALICE)
    before = await list_as_owner(client)
    response = await endpoint.call(client, user_id=ALICE, task_id=task_id, headers=auth(BOB))
    assert_wrong_user(response)
    await assert_nothing_changed(client, before)
    assert await list_as_owner(client, BOB) == []


@pytest.mark.parametrize("endpoint", TASK_ENDPOINTS)
async def test_401_and_403_come_before_404(client: AsyncClient, endpoint: Endpoint) -> None:
    assert_not_authenticated(await endpoint.call(client, task_id=424242))
    assert_invalid_token(await endpoint.call(client, task_id=424242, headers=bearer("x.y.z")))
    assert_wrong_user(await endpoint.call(client, task_id=424242, headers=auth(BOB)))


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS)
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="invalid-json"),
        pytest.param(b'{"title": 42, "completed": "yes"}', id="wrong-types"),
        pytest.param(b"[]", id="array"),
    ],
)
async def test_401_and_403_come_before_422_on_the_body(
    client: AsyncClient, endpoint: Endpoint, body: bytes
) -> None:
    task_id = await create_task(client)
    before = await list_as_owner(client)
    assert_not_authenticated(await endpoint.call(client, task_id=task_id, content=body))
    invalid = await endpoint.call(client, task_id=task_id, content=body, headers=bearer("a.b.c"))
    assert_invalid_token(invalid)
    assert_wrong_user(await endpoint.call(client, task_id=task_id, content=body, headers=auth(BOB)))
    await assert_nothing_changed(client, before)
    # The owner, with the same body, gets the 422 (proof the body really is invalid).
    owner = await endpoint.call(client, task_id=task_id, content=body, headers=auth(ALICE))
    assert owner.status_code == 422, owner.text


@pytest.mark.parametrize("endpoint", TASK_ENDPOINTS)
@pytest.mark.parametrize("task_id", ["abc", str(2**63), "1.5"])
async def test_401_and_403_come_before_422_on_the_task_id(
    client: AsyncClient, endpoint: Endpoint, task_id: str
) -> None:
    assert_not_authenticated(await endpoint.call(client, task_id=task_id))
    assert_invalid_token(await endpoint.call(client, task_id=task_id, headers=bearer("a.b.c")))
    assert_wrong_user(await endpoint.call(client, task_id=task_id, headers=auth(BOB)))
    owner = await endpoint.call(client, task_id=task_id, headers=auth(ALICE))
    assert owner.status_code == 422, owner.text
    assert isinstance(owner.json()["detail"], list)


async def test_user_ids_are_compared_exactly(client: AsyncClient) -> None:
    for path_user in [ALICE.upper(), ALICE + " ", " " + ALICE, ALICE[:-1]]:
        response = await client.get(tasks_url(path_user), headers=auth(ALICE))
        assert_wrong_user(response)


# --- the Authorization header --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_scheme_name_is_case_insensitive(client: AsyncClient, scheme: str) -> None:
    response = await client.get(tasks_url(), headers={"Authorization": f"{scheme} {make_token()}"})
    assert response.status_code == 200, response.text
    assert response.json() == []


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(
            "Basic " + base64.b64encode(f"{ALICE}:password".encode()).decode(), id="basic"
        ),
        pytest.param("Token " + make_token(), id="token-scheme"),
        pytest.param(make_token(), id="no-scheme"),
        pytest.param("Bearer", id="scheme-only"),
        pytest.param("Bearer ", id="empty-token"),
        pytest.param("", id="empty-header"),
    ],
)
async def test_an_authorization_header_without_a_bearer_token_is_401(
    client: AsyncClient, value: str
) -> None:
    response = await client.get(tasks_url(), headers={"Authorization": value})
    assert_not_authenticated(response)


async def test_a_token_elsewhere_than_the_authorization_header_is_not_read(
    client: AsyncClient,
) -> None:
    token = make_token()
    response = await client.get(
        tasks_url(),
        params={"token": token, "access_token": token},
        headers={"Cookie": f"better-auth.session_data={token}"},
    )
    assert_not_authenticated(response)


# --- which tokens are refused --------------------------------------------------------------------


def rsa_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(standard_claims(), key, algorithm="RS256")


def ed25519_token() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return jwt.encode(standard_claims(), key, algorithm="EdDSA", headers={"kid": "some-kid"})


def es256_token() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(standard_claims(), key, algorithm="ES256")


REFUSED_TOKENS: list[Any] = [
    pytest.param(lambda: "garbage", id="garbage"),
    pytest.param(lambda: "a.b.c", id="three-garbage-parts"),
    pytest.param(lambda: make_token().rsplit(".", 1)[0], id="two-parts"),
    pytest.param(lambda: make_token() + ".extra", id="four-parts"),
    pytest.param(lambda: make_token(secret=OTHER_SECRET), id="wrong-secret"),
    pytest.param(lambda: tampered(make_token()), id="tampered-signature"),
    pytest.param(
        lambda: ".".join(
            [
                make_token().split(".")[0],
                b64url_json(standard_claims(BOB)),
                make_token().split(".")[2],
            ]
        ),
        id="swapped-payload",
    ),
    pytest.param(lambda: make_token(lifetime=-31), id="expired-beyond-leeway"),
    pytest.param(lambda: make_token(lifetime=-3600), id="expired-an-hour-ago"),
    pytest.param(lambda: make_token(exp=None), id="no-exp"),
    pytest.param(lambda: make_token(exp="soon"), id="exp-not-a-number"),
    pytest.param(lambda: make_token(nbf=int(time.time()) + 3600), id="nbf-in-an-hour"),
    pytest.param(lambda: make_token(iat=int(time.time()) + 3600), id="iat-in-an-hour"),
    pytest.param(lambda: unsigned_token({"alg": "none"}, standard_claims()), id="alg-none"),
    pytest.param(
        lambda: unsigned_token({"alg": "none", "typ": "JWT"}, standard_claims()), id="alg-none-typ"
    ),
    pytest.param(lambda: unsigned_token({"alg": "None"}, standard_claims()), id="alg-None"),
    pytest.param(lambda: unsigned_token({"alg": "NONE"}, standard_claims()), id="alg-NONE"),
    pytest.param(
        lambda: hmac_signed_token({"alg": "none"}, standard_claims()), id="alg-none-hmac-signed"
    ),
    pytest.param(lambda: hmac_signed_token({}, standard_claims()), id="no-alg"),
    pytest.param(lambda: hmac_signed_token({"alg": ""}, standard_claims()), id="alg-empty"),
    pytest.param(
        lambda: hmac_signed_token({"alg": "hs256"}, standard_claims()), id="alg-lowercase"
    ),
    pytest.param(lambda: hmac_signed_token({"alg": ["HS256"]}, standard_claims()), id="alg-list"),
    pytest.param(
        lambda: hmac_signed_token({"alg": "RS256"}, standard_claims()), id="rs256-hmac-signed"
    ),
    pytest.param(
        lambda: hmac_signed_token({"alg": "EdDSA"}, standard_claims()), id="eddsa-hmac-signed"
    ),
    pytest.param(lambda: hmac_signed_token({"alg": "HS256"}, [ALICE]), id="payload-array"),
    pytest.param(lambda: hmac_signed_token({"alg": "HS256"}, ALICE), id="payload-string"),
    pytest.param(
        lambda: make_token(headers={"jku": "https://attacker.example/jwks.json"}), id="jku"
    ),
    pytest.param(
        lambda: make_token(headers={"x5u": "https://attacker.example/cert.pem"}), id="x5u"
    ),
    pytest.param(
        lambda: make_token(headers={"jwk": {"kty": "oct", "k": b64url(TEST_SECRET.encode())}}),
        id="jwk",
    ),
    pytest.param(lambda: make_token(headers={"x5c": ["MIIBszCCAVmgAwIBAgIU"]}), id="x5c"),
    pytest.param(lambda: make_token(headers={"crit": ["b64"], "b64": True}), id="crit"),
    pytest.param(lambda: make_token(headers={"crit": ["exp"]}), id="crit-unknown"),
    pytest.param(lambda: padded_token(MAX_TOKEN_BYTES), id="larger-than-8-KiB"),
    pytest.param(lambda: largest_token_within(MAX_TOKEN_BYTES + 4), id="just-over-8-KiB"),
    pytest.param(lambda: padded_token(64 * 1024), id="64-KiB"),
    pytest.param(lambda: make_token(""), id="sub-empty"),
    pytest.param(lambda: make_token("   "), id="sub-whitespace"),
    pytest.param(lambda: make_token(None, sub=42), id="sub-integer"),
    pytest.param(lambda: make_token(None, sub=[ALICE]), id="sub-list"),
    pytest.param(lambda: make_token(None, sub={"id": ALICE}), id="sub-object"),
    pytest.param(lambda: make_token("a" * 256), id="sub-too-long"),
    pytest.param(lambda: make_token("alice\nbob"), id="sub-control-character"),
    pytest.param(lambda: make_token(None), id="no-user-claim"),
    pytest.param(lambda: make_token(None, email="alice@example.com"), id="only-email"),
    pytest.param(lambda: make_token(None, session={"id": ALICE}), id="session-id-is-not-the-user"),
    pytest.param(lambda: make_token(None, session=ALICE), id="session-a-string"),
    pytest.param(lambda: make_token(None, user={"userId": ALICE}), id="user-without-id"),
    pytest.param(rsa_token, id="RS256"),
    pytest.param(ed25519_token, id="EdDSA"),
    pytest.param(es256_token, id="ES256"),
]


@pytest.mark.parametrize("build", REFUSED_TOKENS)
async def test_refused_tokens_are_401(client: AsyncClient, build: Callable[[], str]) -> None:
    token = build()
    response = await client.get(tasks_url(), headers=bearer(token))
    assert_invalid_token(response)
    assert token not in response.text


@pytest.mark.parametrize("build", REFUSED_TOKENS)
async def test_refused_tokens_store_nothing(client: AsyncClient, build: Callable[[], str]) -> None:
    response = await client.post(tasks_url(), json={"title": "forged"}, headers=bearer(build()))
    assert_invalid_token(response)
    assert await list_as_owner(client) == []


async def test_a_token_of_up_to_8_kib_is_accepted(client: AsyncClient) -> None:
    token = largest_token_within(MAX_TOKEN_BYTES)
    assert MAX_TOKEN_BYTES - 4 <= len(token) <= MAX_TOKEN_BYTES
    response = await client.get(tasks_url(), headers=bearer(token))
    assert response.status_code == 200, response.text


# --- which tokens are accepted -------------------------------------------------------------------


ACCEPTED_TOKENS: list[Any] = [
    pytest.param(lambda: make_token(ALICE), id="sub"),
    pytest.param(lambda: make_token(ALICE, claim="user_id"), id="user_id"),
    pytest.param(lambda: make_token(ALICE, claim="userId"), id="userId"),
    pytest.param(lambda: make_token(ALICE, claim="id"), id="id"),
    pytest.param(lambda: make_token(None, session={"userId": ALICE}), id="session.userId"),
    pytest.param(lambda: make_token(None, user={"id": ALICE}), id="user.id"),
    pytest.param(
        # Better Auth's cookie cache, as measured: no `sub`; `session.id` is the session's own id.
        lambda: make_token(
            None,
            lifetime=300,
            session={
                "expiresAt": "2026-11-28T07:16:51.399Z",
                "token": "raw-session-token",
                "createdAt": "2026-11-21T07:16:51.399Z",
                "updatedAt": "2026-11-21T07:16:51.399Z",
                "ipAddress": "",
                "userAgent": "Mozilla/5.0",
                "userId": ALICE,
                "id": "session0000000000000000000000001",
            },
            user={
                "name": "alice",
                "email": "alice@example.com",
                "emailVerified": False,
                "createdAt": "2026-11-21T07:16:51.397Z",
                "updatedAt": "2026-11-21T07:16:51.397Z",
                "id": ALICE,
            },
            updatedAt=1795245411401,
            version="1",
            headers={"typ": None},
        ),
        id="better-auth-cookie-cache",
    ),
    pytest.param(
        # The `jose` SignJWT shape most frontends use.
        lambda: make_token(ALICE, email="alice@example.com", name="alice", iss="frontend"),
        id="jose-frontend",
    ),
    pytest.param(lambda: make_token(ALICE, algorithm="HS384"), id="HS384"),
    pytest.param(lambda: make_token(ALICE, algorithm="HS512"), id="HS512"),
    pytest.param(lambda: make_token(ALICE, lifetime=-10), id="expired-within-leeway"),
    pytest.param(lambda: make_token(ALICE, nbf=int(time.time()) + 10), id="nbf-within-leeway"),
    pytest.param(lambda: make_token(ALICE, nbf=int(time.time()) - 10), id="nbf-past"),
    pytest.param(lambda: make_token(ALICE, iat=None), id="no-iat"),
    pytest.param(lambda: make_token(ALICE, aud="https://anything.example"), id="any-aud"),
    pytest.param(lambda: make_token(ALICE, aud=["a", "b"]), id="any-aud-list"),
    pytest.param(lambda: make_token(ALICE, iss="https://anyone.example"), id="any-iss"),
    pytest.param(lambda: make_token(ALICE, headers={"kid": "k1"}), id="with-kid"),
    pytest.param(lambda: make_token(ALICE, headers={"typ": None}), id="no-typ"),
    pytest.param(lambda: make_token(ALICE, lifetime=365 * 24 * 3600), id="long-lived"),
    pytest.param(
        lambda: make_token(ALICE, claim="user_id", sub=None, id="not-the-user"),
        id="user_id-before-id",
    ),
]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("build", ACCEPTED_TOKENS)
async def test_accepted_tokens_act_as_their_user(
    client: AsyncClient, build: Callable[[], str]
) -> None:
    token = build()
    created = await client.post(tasks_url(ALICE), json={"title": "mine"}, headers=bearer(token))
    assert created.status_code == 201, created.text
    assert created.json()["user_id"] == ALICE
    listed = await client.get(tasks_url(ALICE), headers=bearer(token))
    assert listed.status_code == 200
    assert [task["id"] for task in listed.json()] == [created.json()["id"]]
    assert_wrong_user(await client.get(tasks_url(BOB), headers=bearer(token)))


async def test_sub_takes_precedence_over_other_user_claims(client: AsyncClient) -> None:
    token = make_token(BOB, claim="user_id", sub=ALICE, userId=BOB, id=BOB, user={"id": BOB})
    assert (await client.get(tasks_url(ALICE), headers=bearer(token))).status_code == 200
    assert_wrong_user(await client.get(tasks_url(BOB), headers=bearer(token)))


async def test_the_owner_always_comes_from_the_token(client: AsyncClient) -> None:
    response = await client.post(
        tasks_url(ALICE), json={"title": "mine", "user_id": BOB}, headers=auth(ALICE)
    )
    assert response.status_code == 201
    assert response.json()["user_id"] == ALICE
    assert await list_as_owner(client, BOB) == []


# --- issuer and audience, when configured --------------------------------------------------------


@pytest.fixture(scope="module")
async def strict_app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FastAPI]:
    """The real app on SQLite with JWT_ISSUER and JWT_AUDIENCE set."""
    directory: Path = tmp_path_factory.mktemp("strict")
    settings = make_settings(
        database_url=f"sqlite:///{directory / 'todo.db'}",
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def strict_client(strict_app: FastAPI) -> AsyncIterator[AsyncClient]:
    transport = ASGITransport(app=strict_app)
    async with AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"iss": ISSUER, "aud": AUDIENCE}, id="both-right"),
        pytest.param({"iss": ISSUER, "aud": ["someone-else", AUDIENCE]}, id="aud-list"),
    ],
)
async def test_configured_issuer_and_audience_accept_matching_tokens(
    strict_client: AsyncClient, claims: dict[str, Any]
) -> None:
    response = await strict_client.get(tasks_url(), headers=auth(ALICE, **claims))
    assert response.status_code == 200, response.text
    assert response.json() == []


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"aud": AUDIENCE}, id="no-iss"),
        pytest.param({"iss": ISSUER}, id="no-aud"),
        pytest.param({}, id="neither"),
        pytest.param({"iss": "https://attacker.example", "aud": AUDIENCE}, id="wrong-iss"),
        pytest.param({"iss": ISSUER + "/", "aud": AUDIENCE}, id="iss-trailing-slash"),
        pytest.param({"iss": ISSUER, "aud": "other-api"}, id="wrong-aud"),
        pytest.param({"iss": ISSUER, "aud": ["other-api"]}, id="wrong-aud-list"),
        pytest.param({"iss": ISSUER, "aud": AUDIENCE.upper()}, id="aud-case"),
    ],
)
async def test_configured_issuer_and_audience_refuse_other_tokens(
    strict_client: AsyncClient, claims: dict[str, Any]
) -> None:
    response = await strict_client.get(tasks_url(), headers=auth(ALICE, **claims))
    assert_invalid_token(response)


async def test_configured_app_still_answers_403_for_another_users_path(
    strict_client: AsyncClient,
) -> None:
    response = await strict_client.get(
        tasks_url(BOB), headers=auth(ALICE, iss=ISSUER, aud=AUDIENCE)
    )
    assert_wrong_user(response)


# --- auth/jwt.py, directly -----------------------------------------------------------------------


async def test_verifier_returns_the_user_and_the_claims() -> None:
    verifier = TokenVerifier(secret=TEST_SECRET)
    verified = await verifier.verify(make_token(ALICE, email="alice@example.com"))
    assert verified.user_id == ALICE
    assert verified.claims["sub"] == ALICE
    assert verified.claims["email"] == "alice@example.com"


async def test_verifier_uses_the_utf8_bytes_of_the_secret() -> None:
    secret = "sécret-with-ünïcode-0123456789-abcdefghijklmn"
    verifier = TokenVerifier(secret=secret)
    token = jwt.encode(standard_claims(), secret.encode("utf-8"), algorithm="HS256")
    assert (await verifier.verify(token)).user_id == ALICE
    latin1_key = secret.encode("latin-1")
    with pytest.raises(InvalidToken):
        await verifier.verify(jwt.encode(standard_claims(), latin1_key, algorithm="HS256"))


@pytest.mark.parametrize("build", REFUSED_TOKENS)
async def test_verifier_raises_invalid_token(build: Callable[[], str]) -> None:
    with pytest.raises(InvalidToken):
        await TokenVerifier(secret=TEST_SECRET).verify(build())


@pytest.mark.parametrize("leeway", [0, 5])
async def test_verifier_leeway_is_configurable(leeway: int) -> None:
    verifier = TokenVerifier(secret=TEST_SECRET, leeway_seconds=leeway)
    with pytest.raises(InvalidToken):
        await verifier.verify(make_token(lifetime=-(leeway + 2)))
    assert (await verifier.verify(make_token(lifetime=30))).user_id == ALICE


@pytest.mark.parametrize(
    ("issuer", "audience", "claims", "accepted"),
    [
        (ISSUER, None, {"iss": ISSUER, "aud": "anything"}, True),
        (ISSUER, None, {"iss": "other"}, False),
        (ISSUER, None, {}, False),
        (None, AUDIENCE, {"aud": AUDIENCE, "iss": "anyone"}, True),
        (None, AUDIENCE, {"aud": "other"}, False),
        (None, AUDIENCE, {}, False),
        (None, AUDIENCE, {"aud": [AUDIENCE, "other"]}, True),
        (None, AUDIENCE, {"aud": [AUDIENCE, 1]}, False),
        (None, AUDIENCE, {"aud": [AUDIENCE, None]}, False),
        (None, None, {"iss": "anyone", "aud": "anything"}, True),
    ],
)
async def test_verifier_checks_issuer_and_audience_only_when_configured(
    issuer: str | None, audience: str | None, claims: dict[str, Any], accepted: bool
) -> None:
    verifier = TokenVerifier(secret=TEST_SECRET, issuer=issuer, audience=audience)
    token = make_token(ALICE, **claims)
    if accepted:
        assert (await verifier.verify(token)).user_id == ALICE
    else:
        with pytest.raises(InvalidToken):
            await verifier.verify(token)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "HS256", "jku": "https://attacker.example/jwks.json"},
        {"alg": "HS256", "x5u": "https://attacker.example/cert.pem"},
        {"alg": "HS256", "jwk": {"kty": "oct", "k": "AAAA"}},
        {"alg": "HS256", "x5c": ["MIIB"]},
        {"alg": "HS256", "crit": ["b64"], "b64": True},
        {"alg": "HS256", "b64": False},
        {"alg": "HS256", "kid": 5},
        {"alg": "none"},
        {"alg": "NoNe"},
        {"alg": None},
        {"alg": 256},
        {"typ": "JWT"},
    ],
)
def test_parse_token_refuses_unusable_headers(header: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken):
        parse_token(hmac_signed_token(header, standard_claims()))


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "a..c", "!!!.???.***", "é.é.é"],
)
def test_parse_token_refuses_malformed_tokens(token: str) -> None:
    with pytest.raises(InvalidToken):
        parse_token(token)


def test_parse_token_refuses_oversized_tokens_before_decoding() -> None:
    oversized = "x" * (MAX_TOKEN_BYTES - 1) + ".a.b"
    with pytest.raises(InvalidToken, match="8 KiB"):
        parse_token(oversized)


def test_parse_token_returns_the_parts_of_a_valid_token() -> None:
    token = make_token(ALICE, headers={"kid": "key-1"})
    parsed = parse_token(token)
    assert parsed.header["alg"] == "HS256"
    assert parsed.header["kid"] == "key-1"
    assert parsed.claims["sub"] == ALICE
    assert parsed.signing_input == token.rsplit(".", 1)[0].encode()
    signature = token.rsplit(".", 1)[1]
    assert parsed.signature == base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": ALICE},
        {"user_id": ALICE},
        {"userId": ALICE},
        {"id": ALICE},
        {"session": {"userId": ALICE, "id": "session-id"}},
        {"user": {"id": ALICE, "email": "alice@example.com"}},
        {"sub": ALICE, "id": BOB, "user_id": BOB, "session": {"userId": BOB}},
        {"user_id": ALICE, "userId": BOB, "id": BOB},
        {"userId": ALICE, "id": BOB},
        {"session": {"userId": ALICE}, "user": {"id": BOB}},
        {"sub": ALICE, "email": "someone-else@example.com", "name": BOB},
    ],
)
def test_user_id_from_claims_finds_the_user(claims: dict[str, Any]) -> None:
    assert user_id_from_claims(claims) == ALICE


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"email": "alice@example.com"},
        {"sub": ""},
        {"sub": "  "},
        {"sub": 42},
        {"sub": None},
        {"sub": True},
        {"sub": [ALICE]},
        {"sub": "a" * 256},
        {"sub": "alice\x00"},
        {"sub": "alice\n"},
        {"sub": "\ud800"},
        # An empty `sub` is refused outright, never skipped in favour of a weaker claim.
        {"sub": "", "user_id": ALICE},
        {"session": {"id": ALICE}},
        {"session": "userId"},
        {"session": [ALICE]},
        {"user": {"userId": ALICE}},
        {"user": {"id": 42}},
    ],
)
def test_user_id_from_claims_refuses_claims_that_name_no_user(claims: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken):
        user_id_from_claims(claims)


def test_user_id_from_claims_accepts_the_longest_allowed_id() -> None:
    assert user_id_from_claims({"sub": "a" * 255}) == "a" * 255


# --- Tokens only the secret's holder could make, but which must still be canonical -------------


def hs256_from_raw_json(header_json: str, payload_json: str, secret: str = TEST_SECRET) -> str:
    """An HS256 token around JSON text exactly as given (PyJWT would normalise it)."""

    def segment(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()

    signing_input = f"{segment(header_json)}.{segment(payload_json)}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param('{{"sub": "{bob}", "sub": "{alice}", "exp": {exp}}}', id="duplicate-sub"),
        pytest.param('{{"sub": "{alice}", "exp": 1, "exp": {exp}}}', id="duplicate-exp"),
        pytest.param('{{"sub": "{alice}", "exp": "{exp}"}}', id="exp-as-string"),
        pytest.param('{{"sub": "{alice}", "exp": true}}', id="exp-as-boolean"),
        pytest.param('{{"sub": "{alice}", "exp": {exp}, "iat": "0"}}', id="iat-as-string"),
        pytest.param('{{"sub": "{alice}", "exp": Infinity}}', id="exp-infinite"),
        pytest.param('{{"sub": "{alice}", "exp": NaN}}', id="exp-nan"),
        pytest.param('{{"sub": "{alice}", "exp": 1e400}}', id="exp-overflows-to-infinity"),
        pytest.param('{{"sub": "{alice}", "exp": null}}', id="exp-null"),
        pytest.param('{{"sub": "{alice}", "exp": {exp}, "nbf": NaN}}', id="nbf-nan"),
        pytest.param('{{"sub": "{alice}", "exp": {exp}, "nbf": null}}', id="nbf-null"),
        pytest.param('{{"sub": "{alice}", "exp": {exp}, "iat": {exp}}}', id="iat-in-future"),
        pytest.param('{{"sub": "{alice}", "exp": {exp}, "nbf": {exp}}}', id="nbf-in-future"),
        pytest.param('{{"sub": "{alice}", "exp": {exp}, "jti": 7}}', id="jti-not-string"),
        pytest.param('{{"sub": 7, "user_id": "{alice}", "exp": {exp}}}', id="sub-not-string"),
        pytest.param('["{alice}", {exp}]', id="payload-not-object"),
    ],
)
async def test_non_canonical_claims_are_refused_even_when_signed(payload: str) -> None:
    exp = int(time.time()) + 600
    token = hs256_from_raw_json('{"alg": "HS256"}', payload.format(alice=ALICE, bob=BOB, exp=exp))
    with pytest.raises(InvalidToken):
        await TokenVerifier(secret=TEST_SECRET).verify(token)


async def test_a_duplicate_header_member_is_refused() -> None:
    token = hs256_from_raw_json(
        '{"alg": "none", "alg": "HS256"}', f'{{"sub": "{ALICE}", "exp": {int(time.time()) + 60}}}'
    )
    with pytest.raises(InvalidToken):
        await TokenVerifier(secret=TEST_SECRET).verify(token)


def test_time_claims_beyond_float_range_are_compared_not_converted() -> None:
    """JSON integers have no size limit and an unsigned token's claims are checked before any key
    is fetched (JWKS tokens): a 400-digit exp or nbf must be a 401 or a pass, never an error."""
    huge = 10**400
    check_claims({"sub": ALICE, "exp": huge}, issuer=None, audience=None, leeway_seconds=30)
    with pytest.raises(InvalidToken):
        check_claims(
            {"sub": ALICE, "exp": huge, "nbf": huge}, issuer=None, audience=None, leeway_seconds=30
        )
    with pytest.raises(InvalidToken):
        check_claims({"sub": ALICE, "exp": -huge}, issuer=None, audience=None, leeway_seconds=30)


async def test_a_signed_token_with_a_400_digit_exp_is_verified_and_remembered() -> None:
    verifier = TokenVerifier(secret=TEST_SECRET)
    token = hs256_from_raw_json('{"alg": "HS256"}', f'{{"sub": "{ALICE}", "exp": 1{"0" * 400}}}')
    assert (await verifier.verify(token)).user_id == ALICE
    assert (await verifier.verify(token)).user_id == ALICE


async def test_signed_claims_in_their_plain_form_are_accepted() -> None:
    """The counterpart of the refusals above: the same JSON, canonical, passes."""
    exp = int(time.time()) + 600
    payload = f'{{"sub": "{ALICE}", "exp": {exp}.5, "nbf": {exp - 700}, "iat": {exp - 600}}}'
    token = hs256_from_raw_json('{"alg": "HS256", "typ": "JWT"}', payload)
    assert (await TokenVerifier(secret=TEST_SECRET).verify(token)).user_id == ALICE


async def test_a_non_canonical_base64_spelling_is_refused_even_when_signed() -> None:
    """16 bytes of header leave 4 spare bits in the last base64 character: setting them spells
    the same header differently. Signed over that spelling, it is still refused."""
    header = '{"alg": "HS256"}'
    assert len(header) == 16
    canonical = base64.urlsafe_b64encode(header.encode()).rstrip(b"=").decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    stray = canonical[:-1] + alphabet[alphabet.index(canonical[-1]) | 0b0001]
    assert stray != canonical
    assert base64.urlsafe_b64decode(stray + "==") == header.encode()
    claims = base64.urlsafe_b64encode(
        json.dumps({"sub": ALICE, "exp": int(time.time()) + 600}).encode()
    ).rstrip(b"=")
    for spelling, accepted in ((canonical, True), (stray, False)):
        signing_input = f"{spelling}.{claims.decode()}"
        signature = hmac.new(TEST_SECRET.encode(), signing_input.encode(), hashlib.sha256)
        encoded = base64.urlsafe_b64encode(signature.digest()).rstrip(b"=").decode()
        token = f"{signing_input}.{encoded}"
        if accepted:
            assert (await TokenVerifier(secret=TEST_SECRET).verify(token)).user_id == ALICE
        else:
            with pytest.raises(InvalidToken):
                await TokenVerifier(secret=TEST_SECRET).verify(token)


async def test_a_padded_copy_of_a_real_token_is_refused() -> None:
    token = make_token(ALICE)
    assert (await TokenVerifier(secret=TEST_SECRET).verify(token)).user_id == ALICE
    with pytest.raises(InvalidToken):
        await TokenVerifier(secret=TEST_SECRET).verify(token + "==")


async def test_a_remembered_token_still_expires() -> None:
    """Verified tokens are remembered, but never past their own `exp`."""
    verifier = TokenVerifier(secret=TEST_SECRET, leeway_seconds=0)
    token = jwt.encode({"sub": ALICE, "exp": time.time() + 1.5}, TEST_SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).user_id == ALICE
    assert (await verifier.verify(token)).user_id == ALICE
    await asyncio.sleep(2)
    with pytest.raises(InvalidToken):
        await verifier.verify(token)
