"""API keys with scopes, per-key adapter allow-lists and per-key rate limits (no torch).

Keys live in a JSON file (``SERVICE_API_KEYS_FILE``) as SHA-256 hashes — keys are 256-bit random
tokens, so a plain hash is enough and the file never holds a usable secret. Clients send
``Authorization: Bearer <key>`` (what OpenAI clients send). Scopes: ``infer`` (answer, chat,
list models and adapters) and ``admin`` (fine-tune, jobs, import/promote/delete adapters); admin
implies infer. Without a keys file, auth is off — the CLI then refuses to bind a non-loopback
address unless told the deployment is insecure on purpose.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from service.errors import Forbidden, RateLimited, Unauthorized

SCOPES = ("infer", "admin")
KEY_PREFIX = "sk-svc-"


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    adapters: frozenset[str] | None = None  # None = every adapter

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def may_use(self, adapter: str | None) -> bool:
        if adapter is None or self.adapters is None:
            return True
        return adapter.partition("@")[0] in self.adapters


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class KeyFile:
    """The keys file: ``{"keys": [{"name", "sha256", "scopes", "adapters", "created_at"}]}``."""

    path: Path
    keys: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> KeyFile:
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            keys = data["keys"]
            for entry in keys:
                assert isinstance(entry["name"], str) and len(entry["sha256"]) == 64
                assert set(entry["scopes"]) <= set(SCOPES) and entry["scopes"]
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            raise ValueError(f"{path} is not a valid keys file: {exc}") from exc
        return cls(path, keys)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": self.keys}, indent=2) + "\n")
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)

    def add(self, name: str, scopes: list[str], adapters: list[str] | None = None) -> str:
        """Create a key; returns the secret (shown once, never stored)."""
        if any(k["name"] == name for k in self.keys):
            raise ValueError(f"a key named {name!r} exists")
        if not scopes or not set(scopes) <= set(SCOPES):
            raise ValueError(f"scopes must be a non-empty subset of {SCOPES}")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        self.keys.append({"name": name, "sha256": hash_key(secret), "scopes": sorted(set(scopes)),
                          "adapters": sorted(adapters) if adapters else None, "created_at": time.time()})
        return secret

    def revoke(self, name: str) -> None:
        before = len(self.keys)
        self.keys = [k for k in self.keys if k["name"] != name]
        if len(self.keys) == before:
            raise ValueError(f"no key named {name!r}")


class Authenticator:
    """Checks bearer keys (re-reading the keys file when it changes) and applies rate limits."""

    def __init__(self, path: Path | None, rate_limit_per_minute: int = 0):
        self.path = Path(path) if path else None
        self.rate = rate_limit_per_minute
        self._mtime: float | None = None
        self._by_hash: dict[str, Principal] = {}
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        if self.path is not None:
            self._reload()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _reload(self) -> None:
        assert self.path is not None
        mtime = self.path.stat().st_mtime if self.path.exists() else None
        if mtime == self._mtime and self._by_hash:
            return
        keys = KeyFile.load(self.path).keys
        self._by_hash = {
            k["sha256"]: Principal(k["name"], frozenset(k["scopes"]), frozenset(k["adapters"]) if k.get("adapters") else None)
            for k in keys
        }
        self._mtime = mtime

    def authenticate(self, header: str | None) -> Principal | None:
        if not self.enabled:
            return None
        if not header or not header.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        digest = hash_key(header[7:].strip())
        with self._lock:
            self._reload()
            for known, principal in self._by_hash.items():
                if hmac.compare_digest(known, digest):
                    self._take_token(principal.name)
                    return principal
        raise Unauthorized("invalid API key")

    def _take_token(self, name: str) -> None:
        """Token bucket per key: ``rate`` requests a minute, bursts up to ``rate``."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(name, (float(self.rate), now))
        tokens = min(float(self.rate), tokens + (now - last) * self.rate / 60.0)
        if tokens < 1.0:
            self._buckets[name] = (tokens, now)
            raise RateLimited(f"rate limit of {self.rate} requests a minute exceeded",
                              retry_after=(1.0 - tokens) * 60.0 / self.rate)
        self._buckets[name] = (tokens - 1.0, now)


def _require(request: Request, scope: str) -> Principal | None:
    principal = request.app.state.auth.authenticate(request.headers.get("authorization"))
    if principal is not None and not principal.allows(scope):
        raise Forbidden(f"this key lacks the {scope!r} scope")
    request.state.principal = principal
    return principal


def require(scope: str):
    """A route dependency: the caller's key must carry ``scope`` (no-op when auth is off).

    ``async`` because it never blocks (a hash and, when the key file changed, a small read): a
    plain ``def`` would cost every request a round trip through FastAPI's thread pool.
    """

    async def dependency(request: Request) -> Principal | None:
        return _require(request, scope)

    return dependency


def require_read_or_write(read: str = "infer", write: str = "admin"):
    """GET/HEAD need ``read``; every other method needs ``write``."""

    async def dependency(request: Request) -> Principal | None:
        return _require(request, read if request.method in ("GET", "HEAD") else write)

    return dependency


def check_adapter(request: Request, adapter: str | None) -> None:
    """403 when the caller's key is limited to other adapters."""
    principal = getattr(request.state, "principal", None)
    if principal is not None and adapter and adapter.lower() not in ("base", "none") and not principal.may_use(adapter):
        raise Forbidden(f"this key may not use adapter {adapter.partition('@')[0]!r}")
