"""What surrounds the task routes: health, readiness, CORS, OpenAPI, errors for unknown paths,
the collector's settings after start-up."""

import asyncio
import gc

import pytest
from httpx import ASGITransport, AsyncClient

from main import YOUNG_GENERATION_THRESHOLD, create_app
from tests.support import ALICE, auth, make_settings


async def test_health_needs_no_token_and_no_database(client: AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readiness_touches_the_database(client: AsyncClient) -> None:
    for path in ("/health/ready", "/ready"):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": "ready", "database": "ok"}


async def test_an_unreachable_database_is_503_on_readiness_and_health_stays_up() -> None:
    # Port 1 on loopback refuses connections: a real fault, not a mock.
    settings = make_settings(
        database_url="postgresql://postgres@127.0.0.1:1/none", migrate_on_startup=False
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app)
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            ready = await client.get("/health/ready")
            listing = await client.get("/api/u/tasks", headers={})
    assert ready.status_code == 503
    assert ready.headers["Retry-After"].isdigit()
    assert ready.json() == {"detail": "The database is unavailable right now; try again shortly."}
    assert listing.status_code == 401


async def test_cors_preflight_allows_the_frontend_with_credentials(client: AsyncClient) -> None:
    response = await client.options(
        "/api/someone/tasks/",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "PATCH" in response.headers["access-control-allow-methods"]
    allowed_headers = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers
    assert "content-type" in allowed_headers


async def test_cors_refuses_unknown_origins_and_never_answers_star(client: AsyncClient) -> None:
    preflight = await client.options(
        "/api/someone/tasks",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    simple = await client.get("/health", headers={"Origin": "http://localhost:3000"})
    assert simple.headers["access-control-allow-origin"] == "http://localhost:3000"


async def test_errors_carry_cors_headers_so_the_browser_can_read_them(client: AsyncClient) -> None:
    response = await client.get("/api/someone/tasks", headers={"Origin": "http://localhost:3000"})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-total-count" in response.headers["access-control-expose-headers"].lower()


async def test_unknown_paths_and_methods_answer_with_a_detail(client: AsyncClient) -> None:
    missing = await client.get("/api/nothing-here")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Not Found"}
    wrong_method = await client.post("/api/someone/tasks/1")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"detail": "Method Not Allowed"}


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/someone/tasks", "GET, POST"),
        ("POST", "/api/someone/tasks/1", "DELETE, GET, PATCH, PUT"),
        ("GET", "/api/someone/tasks/1/complete", "PATCH"),
    ],
)
async def test_a_405_names_every_method_of_the_path(
    client: AsyncClient, method: str, path: str, allowed: str
) -> None:
    """RFC 9110 §15.5.6: Allow lists the methods the resource has, from all its routes, not
    only the first route registered for the path."""
    response = await client.request(method, path)
    assert response.status_code == 405
    assert response.headers["Allow"] == allowed


async def test_openapi_documents_bearer_auth_and_every_error(client: AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["BetterAuthJWT"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["BetterAuthJWT"]["description"],
    }
    operations = {
        (method.upper(), path): operation
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if path.startswith("/api/")
    }
    assert set(operations) == {
        ("GET", "/api/{user_id}/tasks"),
        ("POST", "/api/{user_id}/tasks"),
        ("GET", "/api/{user_id}/tasks/{task_id}"),
        ("PUT", "/api/{user_id}/tasks/{task_id}"),
        ("PATCH", "/api/{user_id}/tasks/{task_id}"),
        ("DELETE", "/api/{user_id}/tasks/{task_id}"),
        ("PATCH", "/api/{user_id}/tasks/{task_id}/complete"),
    }
    for (method, path), operation in operations.items():
        documented = set(operation["responses"])
        assert {"401", "403", "422"} <= documented, (method, path)
        if "{task_id}" in path:
            assert "404" in documented, (method, path)
        assert operation["security"] == [{"BetterAuthJWT": []}]
        assert operation.get("description"), (method, path)
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text


async def test_requests_in_flight_do_not_set_off_young_collections(client: AsyncClient) -> None:
    # The lifespan (run by the `app` fixture) raised the young generation's trigger above what
    # requests in flight hold; under the default trigger, the same burst sets off collections.
    raised = gc.get_threshold()
    assert raised[0] == YOUNG_GENERATION_THRESHOLD
    assert gc.get_freeze_count() > 0
    for number in range(20):
        created = await client.post(
            f"/api/{ALICE}/tasks", json={"title": f"t{number}"}, headers=auth()
        )
        assert created.status_code == 201

    async def young_collections_during_a_burst() -> int:
        collections = 0

        def count(phase: str, info: dict[str, int]) -> None:
            nonlocal collections
            if phase == "start" and info["generation"] == 0:
                collections += 1

        gc.collect()
        gc.callbacks.append(count)
        try:
            answers = await asyncio.gather(
                *(client.get(f"/api/{ALICE}/tasks", headers=auth()) for _ in range(12))
            )
        finally:
            gc.callbacks.remove(count)
        assert all(answer.status_code == 200 and len(answer.json()) == 20 for answer in answers)
        return collections

    try:
        gc.set_threshold(700, *raised[1:])  # CPython's default
        with_default_trigger = await young_collections_during_a_burst()
    finally:
        gc.set_threshold(*raised)
    assert with_default_trigger > 0
    assert await young_collections_during_a_burst() == 0
