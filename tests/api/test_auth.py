"""API keys: 401/403 on every protected route, adapter allow-lists, rate limits, safe binding."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.auth import KeyFile
from service.config import Settings
from tests.helpers import publish_random_adapter

PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@pytest.fixture()
def keys(tmp_path):
    keyfile = KeyFile.load(tmp_path / "keys.json")
    secrets = {
        "infer": keyfile.add("app", ["infer"]),
        "admin": keyfile.add("ops", ["admin"]),
        "team-a": keyfile.add("team-a", ["infer", "admin"], adapters=["a"]),
    }
    keyfile.save()
    return tmp_path / "keys.json", secrets


@pytest.fixture()
def client(tiny_base_dir, tiny_base, tmp_path, keys):
    path, _ = keys
    for seed, name in enumerate("ab", start=1):
        publish_random_adapter(tiny_base, tmp_path / "adapters", name, 1, seed=seed)
    settings = Settings(model=tiny_base_dir, adapter_dir=tmp_path / "adapters", data_dir=tmp_path / "data",
                        api_keys_file=path, embedded_trainer=False, rate_limit_per_minute=1000)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        yield c


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def protected_routes(app):
    """Every (method, path) of the OpenAPI spec that is not public."""
    for path, operations in app.openapi()["paths"].items():
        if path in PUBLIC:
            continue
        for method in operations:
            yield method.upper(), path.replace("{job_id}", "ftjob-x").replace("{name}", "a")


def test_the_keys_file_holds_no_secret(keys):
    path, secrets = keys
    text = path.read_text()
    assert all(secret not in text for secret in secrets.values())
    assert all(secret.startswith("sk-svc-") for secret in secrets.values())


def test_every_protected_route_needs_a_valid_key(client):
    routes = list(protected_routes(client.app))
    assert len(routes) >= 12
    for method, path in routes:
        missing = client.request(method, path)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.request(method, path, headers=bearer("sk-svc-not-a-key"))
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200


def test_infer_scope_cannot_administer_and_admin_can_infer(client, keys):
    _, secrets = keys
    infer, admin = bearer(secrets["infer"]), bearer(secrets["admin"])
    body = {"instruction": "hi", "max_new_tokens": 2}
    assert client.post("/v1/answer", json=body, headers=infer).status_code == 200
    assert client.post("/v1/answer", json=body, headers=admin).status_code == 200
    assert client.get("/v1/adapters", headers=infer).status_code == 200
    for method, path in [("GET", "/v1/finetune"), ("POST", "/v1/finetune"), ("DELETE", "/v1/adapters/a"),
                         ("POST", "/v1/adapters/a/promote"), ("POST", "/v1/adapters"), ("GET", "/v1/finetune/ftjob-x")]:
        r = client.request(method, path, headers=infer)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (method, path)
    assert client.get("/v1/finetune", headers=admin).status_code == 200


def test_a_key_limited_to_one_adapter(client, keys):
    _, secrets = keys
    team = bearer(secrets["team-a"])
    body = {"instruction": "hi", "max_new_tokens": 2}
    assert client.post("/v1/answer?adapter=a", json=body, headers=team).status_code == 200
    assert client.post("/v1/answer", json=body, headers=team).status_code == 200  # the base is shared
    assert client.post("/v1/answer?adapter=b@1", json=body, headers=team).status_code == 403
    chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat, headers=team).status_code == 403
    assert client.delete("/v1/adapters/b", headers=team).status_code == 403
    assert client.post("/v1/adapters/b/promote", json={"version": 1}, headers=team).status_code == 403
    ids = [m["id"] for m in client.get("/v1/models", headers=team).json()["data"]]
    assert "a" in ids and "b" not in ids
    assert client.get("/v1/adapters/b", headers=bearer(secrets["admin"])).status_code == 200


def test_revoked_keys_stop_working_without_a_restart(client, keys):
    path, secrets = keys
    assert client.get("/v1/models", headers=bearer(secrets["infer"])).status_code == 200
    keyfile = KeyFile.load(path)
    keyfile.revoke("app")
    keyfile.save()
    assert client.get("/v1/models", headers=bearer(secrets["infer"])).status_code == 401


def test_rate_limit_per_key(tiny_base_dir, tmp_path, keys):
    path, secrets = keys
    settings = Settings(model=tiny_base_dir, adapter_dir=tmp_path / "adapters", data_dir=tmp_path / "data",
                        api_keys_file=path, embedded_trainer=False, rate_limit_per_minute=3)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        codes = [c.get("/v1/models", headers=bearer(secrets["infer"])).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = c.get("/v1/models", headers=bearer(secrets["infer"]))
        assert limited.json()["error"]["code"] == "rate_limited" and int(limited.headers["retry-after"]) >= 1
        # Another key has its own budget.
        assert c.get("/v1/models", headers=bearer(secrets["admin"])).status_code == 200


def test_refuses_a_public_bind_without_keys(tiny_base_dir, tmp_path):
    with pytest.raises(ValueError, match="refusing to bind"):
        Settings(host="0.0.0.0").check_safe_to_serve()
    Settings(host="0.0.0.0", insecure=True).check_safe_to_serve()
    Settings(host="0.0.0.0", api_keys_file=tmp_path / "k.json").check_safe_to_serve()
    Settings(host="127.0.0.1").check_safe_to_serve()
    done = subprocess.run([sys.executable, "-m", "service", "serve", "--host", "0.0.0.0", "--model", str(tiny_base_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "refusing to bind 0.0.0.0" in done.stderr


def test_keys_cli_add_list_revoke(tmp_path):
    path = tmp_path / "keys.json"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "service", "keys", *args, "--file", str(path)],
                              capture_output=True, text=True, timeout=60)

    added = run("add", "--name", "ci", "--scope", "infer,admin", "--adapters", "line-inspection")
    assert added.returncode == 0 and added.stdout.strip().startswith("sk-svc-")
    stored = json.loads(path.read_text())["keys"][0]
    assert stored["scopes"] == ["admin", "infer"] and stored["adapters"] == ["line-inspection"]
    assert added.stdout.strip() not in path.read_text()
    assert "ci\tadmin,infer\tline-inspection" in run("list").stdout
    assert run("add", "--name", "ci").returncode != 0  # duplicate
    assert run("revoke", "--name", "ci").returncode == 0
    assert json.loads(path.read_text())["keys"] == []
