"""Session summary of the OpenAPI validation (each test's fixture already fails on its own bad responses).

Named to run last in `tests/sim`; it needs the rest of the directory to have run first.
"""

from __future__ import annotations

from simhelpers import RECORDER

# Operations the simulator's tests must have exercised (and so validated) at least once.
EXPECTED_ROUTES = {
    ("GET", "/servers"), ("POST", "/servers"), ("GET", "/servers/{id}"), ("PUT", "/servers/{id}"),
    ("DELETE", "/servers/{id}"), ("GET", "/actions"), ("GET", "/actions/{id}"), ("GET", "/servers/{id}/actions"),
    ("POST", "/servers/{id}/actions/enable_rescue"), ("POST", "/servers/{id}/actions/reset"),
    ("POST", "/servers/{id}/actions/create_image"), ("GET", "/ssh_keys"), ("POST", "/ssh_keys"),
    ("GET", "/images"), ("GET", "/locations"),
}  # fmt: skip


def test_every_recorded_response_matched_the_openapi_document() -> None:
    assert RECORDER.failures == []
    assert len(RECORDER.checked) >= 300
    seen = {(method, route) for method, route, _ in RECORDER.checked}
    assert EXPECTED_ROUTES - seen == set()
    assert {status for _, _, status in RECORDER.checked} >= {200, 201, 204, 400, 401, 404, 409, 423, 429, 503}
