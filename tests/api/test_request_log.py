"""The request-log middleware: request ids, per-route metrics and one JSON log line per request."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings


@pytest.fixture()
def client(tmp_path):
    # No engine needed: the middleware wraps every route, including the ones that answer without a model.
    settings = Settings(model=tmp_path, adapter_dir=tmp_path / "adapters", data_dir=tmp_path / "data")
    with TestClient(create_app(settings, engine_factory=lambda s: None, load_in_background=False)) as c:
        yield c


def sample(metrics_text: str, name: str, **labels: str) -> float:
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in metrics_text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_response_carries_a_request_id_and_a_given_one_is_echoed(client):
    first, second = client.get("/healthz"), client.get("/healthz")
    assert len(first.headers["x-request-id"]) == 16 and first.headers["x-request-id"] != second.headers["x-request-id"]
    assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert client.get("/no/such/path").headers["x-request-id"]


def test_requests_are_counted_by_route_template_and_status(client):
    before = client.get("/metrics").text
    client.get("/healthz")
    assert client.get("/v1/adapters/some-name").status_code in (401, 404, 503)
    assert client.get("/no/such/path").status_code == 404
    after = client.get("/metrics").text
    assert sample(after, "service_requests_total", route="/healthz", status="200") == \
        sample(before, "service_requests_total", route="/healthz", status="200") + 1
    assert sample(after, "service_requests_total", route="unmatched", status="404") == \
        sample(before, "service_requests_total", route="unmatched", status="404") + 1
    # A route with a path parameter is counted under its template, never the raw path.
    assert "some-name" not in after
    assert sample(after, "service_request_latency_seconds_count", route="/healthz") >= 1


def test_one_json_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="service.api.app"):
        client.get("/healthz", headers={"x-request-id": "req-1"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.api.app" and "req-1" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0]["method"] == "GET" and lines[0]["path"] == "/healthz" and lines[0]["status"] == 200
    assert lines[0]["ms"] >= 0
