"""Schemathesis against the running app's own OpenAPI document, with a valid token.

Every generated request, valid or not, must get a documented status, a response matching the
documented schema and content type, and never a 5xx.
"""

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.generation.case import Case

from main import create_app
from tests.support import ALICE, make_settings, make_token, uvicorn_server

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_base_url(postgres_url: str) -> Iterator[str]:
    with uvicorn_server(postgres_url) as (_, base_url):
        yield base_url


# The document the server publishes, taken from the app itself at collection time.
schema = schemathesis.openapi.from_dict(create_app(make_settings()).openapi())


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_response_is_documented_and_none_is_a_server_error(
    case: Case[Any], api_base_url: str
) -> None:
    # Most requests act as the token's own user, so they reach the task logic; the rest of
    # the generated paths exercise the 403 answer.
    if "user_id" in (case.path_parameters or {}) and hash(repr(case.body)) % 4:
        case.path_parameters["user_id"] = ALICE
    case.call_and_validate(
        base_url=api_base_url,
        headers={"Authorization": f"Bearer {make_token(ALICE)}"},
        checks=CHECKS,
    )
