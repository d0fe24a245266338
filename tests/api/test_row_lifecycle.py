"""A waiting request's row over HTTP: freed when the client goes away, and when its time limit passes."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.engine.engine import Engine
from service.engine.jobs import AnswerJob
from tests.helpers import poll as wait_until


class HeldEngine(Engine):
    """A real engine whose worker can be held, and which remembers the rows it was given."""

    def __init__(self, settings: Settings, base) -> None:
        super().__init__(settings, base=base)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.rows = []

    def submit(self, job, on_text=None):
        row = super().submit(job, on_text)
        self.rows.append(row)
        return row

    def _admit(self, rows):
        self.entered.set()
        self.gate.wait(30)
        super()._admit(rows)

    def hold(self) -> None:
        """Occupy the worker with a request of its own, so the next ones wait in the queue."""
        super().submit(AnswerJob("hi", [], None, 2))
        assert self.entered.wait(30)


@pytest.fixture()
def make_app(tiny_base, tmp_path):
    engines = []

    def make(**overrides):
        overrides.setdefault("n_slots", tiny_base.slots.n_slots)
        settings = Settings(model=tmp_path, adapter_dir=tmp_path / "adapters", data_dir=tmp_path / "data", **overrides)

        def factory(s):
            engines.append(HeldEngine(s, tiny_base))
            return engines[-1]

        return create_app(settings, engine_factory=factory, load_in_background=False), engines

    yield make
    for engine in engines:
        engine.gate.set()


def test_a_request_past_its_time_limit_gets_504_and_its_row_is_freed(make_app):
    app, engines = make_app(request_timeout_s=0.5)
    with TestClient(app) as client:
        engine = engines[0]
        engine.hold()
        started = time.monotonic()
        response = client.post("/v1/answer", json={"instruction": "What colour?", "max_new_tokens": 2})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert 0.4 < time.monotonic() - started < 5
        (row,) = engine.rows
        assert row.cancelled.is_set()
        engine.gate.set()
        with pytest.raises(Exception, match="cancelled"):
            row.future.result(timeout=30)  # dropped by the worker, never generated


def test_a_client_that_disconnects_frees_its_row(make_app):
    app, engines = make_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        engine = engines[0]
        engine.hold()
        body = json.dumps({"instruction": "What colour?", "max_new_tokens": 2}).encode()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert wait_until(lambda: len(engine.rows) == 1)  # queued behind the held request
            row = engine.rows[0]
            assert not row.cancelled.is_set()
        # The socket is closed: the handler notices and cancels the row while it still waits.
        assert wait_until(row.cancelled.is_set, timeout_s=5)
        engine.gate.set()
        with pytest.raises(Exception, match="cancelled"):
            row.future.result(timeout=30)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
