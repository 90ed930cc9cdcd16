"""Better Auth JWT plugin tokens: verified against a real JWKS endpoint, forgeries refused."""

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from httpx import AsyncClient
from jwt.algorithms import RSAAlgorithm

from tests.jwks_server import (
    IdleClosingJWKSServer,
    JWKSServer,
    SigningKey,
    closed_port_url,
    silent_listener,
)
from tests.support import ALICE, BOB, auth, running_app

ALGORITHMS = ["EdDSA", "ES256", "RS256", "PS256"]


def backend_for(
    better_auth_url: str, database: Path, **overrides: Any
) -> AbstractAsyncContextManager[AsyncClient]:
    overrides.setdefault("jwks_refresh_cooldown_seconds", 0.2)
    return running_app(
        better_auth_url=better_auth_url, database_url=f"sqlite:///{database}", **overrides
    )


@pytest.fixture
async def jwks() -> AsyncIterator[JWKSServer]:
    async with JWKSServer().running() as server:
        yield server


@pytest.fixture
async def client(jwks: JWKSServer, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    async with backend_for(jwks.base_url, tmp_path / "jwks.db") as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_by(jwks: JWKSServer, key: SigningKey, user_id: str = ALICE, **kwargs: Any) -> str:
    kwargs.setdefault("issuer", jwks.base_url)
    kwargs.setdefault("audience", jwks.base_url)
    return key.sign(user_id, **kwargs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_tokens_signed_with_a_published_key_act_for_their_user(
    jwks: JWKSServer, client: AsyncClient, algorithm: str
) -> None:
    key = SigningKey.generate(algorithm)
    jwks.publish(key)
    token = signed_by(jwks, key)
    created = await client.post(f"/api/{ALICE}/tasks", json={"title": "t"}, headers=bearer(token))
    assert created.status_code == 201
    assert created.json()["user_id"] == ALICE
    listed = await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))
    assert [task["id"] for task in listed.json()] == [created.json()["id"]]
    other_path = await client.get(f"/api/{BOB}/tasks", headers=bearer(token))
    assert other_path.status_code == 403
    bobs = await client.post(f"/api/{BOB}/tasks", json={"title": "b"}, headers=auth(BOB))
    other_task = await client.get(f"/api/{ALICE}/tasks/{bobs.json()['id']}", headers=bearer(token))
    assert other_task.status_code == 404


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_a_token_naming_a_published_key_but_not_signed_by_it_is_refused(
    jwks: JWKSServer, client: AsyncClient, algorithm: str
) -> None:
    """The kid and alg of a published key, but another key's signature (an impostor's), or a
    genuine signature over other claims (Alice's signature on Bob's claims): both 401."""
    published = SigningKey.generate(algorithm)
    impostor = SigningKey.generate(algorithm)
    impostor.kid = published.kid
    jwks.publish(published)
    genuine = signed_by(jwks, published)
    assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(genuine))).status_code == 200
    header, _, signature = genuine.split(".")
    bobs_claims = signed_by(jwks, published, user_id=BOB).split(".")[1]
    for token, path_user in (
        (signed_by(jwks, impostor), ALICE),
        (f"{header}.{bobs_claims}.{signature}", BOB),
    ):
        response = await client.get(f"/api/{path_user}/tasks", headers=bearer(token))
        assert response.status_code == 401, token


async def test_a_400_digit_exp_is_a_401_or_a_200_never_a_500(
    jwks: JWKSServer, client: AsyncClient
) -> None:
    """Claims are checked before the key is fetched: an unsigned-for token with an exp too large
    for a float must be refused like any other forgery, and a genuine one accepted."""
    published = SigningKey.generate("EdDSA")
    impostor = SigningKey.generate("EdDSA")
    impostor.kid = published.kid
    jwks.publish(published)
    for key, expected in ((impostor, 401), (published, 200)):
        token = signed_by(jwks, key, lifetime=10**400)
        response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))
        assert response.status_code == expected


async def test_better_auths_default_jwks_shape_is_understood(
    jwks: JWKSServer, client: AsyncClient
) -> None:
    """kty OKP, crv Ed25519, alg EdDSA, no `use`, and a token header with no `typ`."""
    key = SigningKey.generate("EdDSA")
    published = key.public_jwk()
    assert published.keys() == {"kty", "crv", "x", "kid", "alg"}
    jwks.keys = [published]
    token = signed_by(jwks, key, email="a@example.com", name="A", emailVerified=False, id=ALICE)
    response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))
    assert response.status_code == 200


async def test_keys_are_fetched_once_and_cached(jwks: JWKSServer, client: AsyncClient) -> None:
    key = SigningKey.generate("EdDSA")
    jwks.publish(key)
    for _ in range(5):
        response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(signed_by(jwks, key)))
        assert response.status_code == 200
    assert jwks.fetches == 1


async def test_a_rotated_key_is_followed_without_a_restart(
    jwks: JWKSServer, client: AsyncClient
) -> None:
    old = SigningKey.generate("EdDSA")
    jwks.publish(old)
    old_token = signed_by(jwks, old)
    assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(old_token))).status_code == 200
    new = SigningKey.generate("EdDSA")
    jwks.publish(new)  # Better Auth restarted with in-memory keys: a new kid, the old key gone
    response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(signed_by(jwks, new)))
    assert response.status_code == 200
    assert jwks.fetches == 2
    # The old key is no longer published, so its tokens are no longer trusted.
    assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(old_token))).status_code == 401


async def test_random_kids_cannot_make_the_backend_hammer_better_auth(
    jwks: JWKSServer, tmp_path: Path
) -> None:
    key = SigningKey.generate("EdDSA")
    jwks.publish(key)
    # The burst gets a single refresh only if all of it reaches the backend within one cool-down
    # of the first fetch. It takes under 0.1 s: 3 s leave room for a machine many times slower,
    # at the price of the burst waiting that long for its refresh. Well below 5 s: a refresh
    # about 5 s after the first fetch would reuse its connection just as the JWKS server
    # (uvicorn, 5 s keep-alive) closes it, and fail.
    async with backend_for(
        jwks.base_url, tmp_path / "db.sqlite", jwks_refresh_cooldown_seconds=3.0
    ) as client:
        assert (
            await client.get(f"/api/{ALICE}/tasks", headers=bearer(signed_by(jwks, key)))
        ).status_code == 200
        forged = []
        for _ in range(40):
            stranger = SigningKey.generate("EdDSA")
            stranger.kid = uuid.uuid4().hex
            forged.append(signed_by(jwks, stranger))
        responses = await asyncio.gather(
            *(client.get(f"/api/{ALICE}/tasks", headers=bearer(token)) for token in forged)
        )
    assert {response.status_code for response in responses} == {401}
    # One fetch at start, then one refresh for the whole burst of unknown kids.
    assert jwks.fetches == 2


async def test_requests_that_arrive_while_the_first_keys_are_fetched_wait_for_them(
    jwks: JWKSServer, tmp_path: Path
) -> None:
    """A page load sends several requests at once to a worker that has no keys yet: they wait
    for the one fetch under way; none is told Better Auth is unreachable."""
    key = SigningKey.generate("EdDSA")
    jwks.publish(key)
    jwks.delay_seconds = 0.5  # the fetch is still under way when the other requests arrive
    async with backend_for(
        jwks.base_url, tmp_path / "db.sqlite", jwks_refresh_cooldown_seconds=2.0
    ) as client:
        tokens = [signed_by(jwks, key, user_id=user) for user in (ALICE, BOB) * 3]
        responses = await asyncio.gather(
            *(
                client.get(f"/api/{user}/tasks", headers=bearer(token))
                for user, token in zip((ALICE, BOB) * 3, tokens, strict=True)
            )
        )
    assert [response.status_code for response in responses] == [200] * 6
    assert jwks.fetches == 1


@pytest.mark.parametrize(
    ("declared", "signing", "header_alg"),
    [
        ("ES256", "RS256", "RS256"),  # a token claiming an algorithm its key is not bound to
        ("RS256", "RS256", "PS256"),  # same RSA key, another algorithm than the declared one
        ("EdDSA", "ES256", "ES256"),
    ],
)
async def test_a_key_verifies_only_its_own_algorithm(
    jwks: JWKSServer, client: AsyncClient, declared: str, signing: str, header_alg: str
) -> None:
    published = SigningKey.generate(declared)
    attacker = SigningKey.generate(signing)
    attacker.kid = published.kid
    if declared == signing:
        attacker = published
    jwks.publish(published)
    token = signed_by(jwks, attacker, algorithm=header_alg)
    response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))
    assert response.status_code == 401


async def test_an_hs256_token_hmacd_with_the_public_key_is_refused(
    jwks: JWKSServer, client: AsyncClient
) -> None:
    """The classic algorithm confusion: the verifier must never use a public key as an HMAC key."""
    key = SigningKey.generate("RS256")
    jwks.publish(key)
    public_pem = key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_jwk = json.dumps(key.public_jwk()).encode()
    for secret in (public_pem, public_jwk):
        header = b64url(json.dumps({"alg": "HS256", "kid": key.kid}).encode())
        payload = b64url(
            json.dumps(
                {"sub": ALICE, "exp": 4102444800, "iss": jwks.base_url, "aud": jwks.base_url}
            ).encode()
        )
        signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        token = f"{header}.{payload}.{b64url(signature)}"
        response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))
        assert response.status_code == 401


async def test_symmetric_keys_in_the_jwks_are_never_used(
    jwks: JWKSServer, client: AsyncClient
) -> None:
    shared = b"published-in-the-jwks-0123456789abcdef"
    jwks.keys = [{"kty": "oct", "kid": "sym", "alg": "HS256", "k": b64url(shared)}]
    header = b64url(json.dumps({"alg": "HS256", "kid": "sym"}).encode())
    payload = b64url(json.dumps({"sub": ALICE, "exp": 4102444800}).encode())
    signature = hmac.new(shared, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(signature)}"
    assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))).status_code == 401


@pytest.mark.parametrize(
    "claims",
    [
        {"issuer": "https://evil.example"},
        {"audience": "https://evil.example"},
        {"issuer": None},
        {"audience": None},
        {"lifetime": -120},
        {"nbf": 4102444800},
        {"iat": 4102444800},
        {"user_id": ""},
        {"user_id": None},
    ],
)
async def test_claims_are_checked_and_refused_without_fetching_keys(
    jwks: JWKSServer, client: AsyncClient, claims: dict[str, Any]
) -> None:
    key = SigningKey.generate("EdDSA")
    jwks.publish(key)
    user_id = claims.pop("user_id", ALICE)
    token = signed_by(jwks, key, user_id, **claims)
    response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))
    assert response.status_code == 401
    assert jwks.fetches == 0


@pytest.mark.parametrize(
    "headers",
    [{"jku": "https://evil.example/jwks"}, {"x5u": "https://evil.example/cert"}, {"crit": ["exp"]}],
)
async def test_token_supplied_key_locations_are_never_followed(
    jwks: JWKSServer, client: AsyncClient, headers: dict[str, Any]
) -> None:
    key = SigningKey.generate("EdDSA")
    jwks.publish(key)
    token = signed_by(jwks, key, headers=headers)
    assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))).status_code == 401
    assert jwks.fetches == 0


async def test_an_embedded_jwk_header_is_refused(jwks: JWKSServer, client: AsyncClient) -> None:
    attacker = SigningKey.generate("EdDSA")
    jwks.publish(SigningKey.generate("EdDSA"))
    token = signed_by(jwks, attacker, headers={"jwk": attacker.public_jwk()})
    assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))).status_code == 401


async def test_custom_issuer_and_audience(jwks: JWKSServer, tmp_path: Path) -> None:
    key = SigningKey.generate("EdDSA")
    jwks.publish(key)
    async with backend_for(
        jwks.base_url,
        tmp_path / "db.sqlite",
        better_auth_issuer="https://auth.example.com",
        better_auth_audience="todo-api",
    ) as client:
        good = key.sign(ALICE, issuer="https://auth.example.com", audience="todo-api")
        default = signed_by(jwks, key)
        assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(good))).status_code == 200
        assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(default))).status_code == 401


async def test_unreachable_jwks_is_503_and_hs256_keeps_working(tmp_path: Path) -> None:
    url = closed_port_url()
    key = SigningKey.generate("EdDSA")
    async with backend_for(url, tmp_path / "db.sqlite") as client:
        token = key.sign(ALICE, issuer=url, audience=url)
        for _ in range(2):  # the second within the cool-down: answered at once
            response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))
            assert response.status_code == 503
            assert response.headers["Retry-After"].isdigit()
            assert response.json()["detail"].startswith("The token cannot be checked right now")
        assert (await client.get(f"/api/{ALICE}/tasks", headers=auth(ALICE))).status_code == 200


async def test_a_jwks_that_never_answers_is_503_not_a_hang(tmp_path: Path) -> None:
    key = SigningKey.generate("EdDSA")
    async with silent_listener() as url, backend_for(url, tmp_path / "db.sqlite") as client:
        token = key.sign(ALICE, issuer=url, audience=url)
        # The guard only keeps a regression from hanging the suite; the bound is the app's.
        async with asyncio.timeout(30):
            response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))
            health = await client.get("/health")
    assert response.status_code == 503
    assert health.status_code == 200


async def test_a_broken_jwks_document_is_503(jwks: JWKSServer, client: AsyncClient) -> None:
    jwks.keys = "not a list"  # type: ignore[assignment]
    key = SigningKey.generate("EdDSA")
    response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(signed_by(jwks, key)))
    assert response.status_code == 503


async def test_a_kid_that_is_not_a_string_is_refused(jwks: JWKSServer, client: AsyncClient) -> None:
    key = SigningKey.generate("EdDSA")
    jwks.publish(key)
    _, payload, signature = signed_by(jwks, key).split(".")
    header = b64url(json.dumps({"alg": "EdDSA", "kid": 7}).encode())
    token = f"{header}.{payload}.{signature}"
    assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))).status_code == 401


async def test_a_private_key_published_by_mistake_verifies_nothing(
    jwks: JWKSServer, client: AsyncClient
) -> None:
    """A JWKS carrying an RSA private key (with `d`): never used, a 401, not a 500."""
    key = SigningKey.generate("RS256")
    assert isinstance(key.private_key, rsa.RSAPrivateKey)
    private_jwk = RSAAlgorithm.to_jwk(key.private_key, as_dict=True)
    jwks.keys = [{**private_jwk, "kid": key.kid, "alg": "RS256"}]
    response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(signed_by(jwks, key)))
    assert response.status_code == 401


async def test_a_token_that_expires_while_the_keys_are_fetched_is_refused(
    jwks: JWKSServer, tmp_path: Path
) -> None:
    """Claims are checked before Better Auth is asked for keys, and again after the wait."""
    key = SigningKey.generate("EdDSA")
    jwks.publish(key)
    # Longer than the token has left (its exp is the next whole second at most), and well
    # within the fetch timeout (2.5 s), so that a slow machine does not time the fetch out.
    jwks.delay_seconds = 1.2
    async with backend_for(jwks.base_url, tmp_path / "db.sqlite", jwt_leeway_seconds=0) as client:
        expiring = signed_by(jwks, key, lifetime=1)
        response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(expiring))
        assert response.status_code == 401
        lasting = signed_by(jwks, key)  # the keys are cached now: no wait
        response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(lasting))
        assert response.status_code == 200


async def test_malformed_published_keys_are_skipped(jwks: JWKSServer, client: AsyncClient) -> None:
    good = SigningKey.generate("EdDSA")
    rsa_key = SigningKey.generate("RS256")
    broken_rsa = {**rsa_key.public_jwk(), "n": 12345}
    jwks.keys = [
        {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "list-alg", "alg": ["EdDSA"]},
        broken_rsa,
        "not an object",  # type: ignore[list-item]
        good.public_jwk(),
    ]
    assert (
        await client.get(f"/api/{ALICE}/tasks", headers=bearer(signed_by(jwks, good)))
    ).status_code == 200
    forged = signed_by(jwks, rsa_key)  # its published key is broken: verifies nothing
    assert (await client.get(f"/api/{ALICE}/tasks", headers=bearer(forged))).status_code == 401


async def test_a_refresh_after_a_pause_does_not_send_on_a_connection_the_server_let_go(
    tmp_path: Path,
) -> None:
    """Better Auth runs on Node, which closes a keep-alive connection after 5 s idle (as uvicorn
    does); a refresh sent on one just as it is closed fails, and every request waiting for the
    new key would get a 503. The app lets its own idle connections go sooner than such a server,
    so a refresh after a pause opens a new connection."""
    first, rotated = SigningKey.generate("EdDSA"), SigningKey.generate("EdDSA")
    async with IdleClosingJWKSServer(idle_seconds=1.5).running() as jwks:
        jwks.publish(first)
        async with backend_for(jwks.base_url, tmp_path / "db.sqlite") as client:
            first_use = await client.get(
                f"/api/{ALICE}/tasks", headers=bearer(signed_by(jwks, first))
            )
            assert first_use.status_code == 200
            await asyncio.sleep(2.0)  # longer than the server keeps an idle connection
            jwks.publish(first, rotated)
            token = signed_by(jwks, rotated)
            response = await client.get(f"/api/{ALICE}/tasks", headers=bearer(token))
    assert response.status_code == 200
    assert (jwks.fetches, jwks.dropped) == (2, 0)
