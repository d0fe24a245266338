#!/usr/bin/env python3
"""Container health check for the service image (standard library only: no curl in the image).

    service-healthcheck            GET /healthz  (the process is alive)
    service-healthcheck --ready    GET /readyz   (the model is loaded; 503 until then)

It asks the server in this container on ``SERVICE_PORT`` (default 8000). A container whose main
command is ``python -m service trainer`` (or anything other than ``serve``) has no HTTP server:
it counts as healthy while it runs. Exit 0 = healthy, 1 = unhealthy (what Docker expects).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def _main_command() -> str:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main(argv: list[str]) -> int:
    command = _main_command()
    if command and " serve" not in command:
        print(f"no HTTP server in this container ({command.strip()[:80]}): healthy while running")
        return 0
    path = "/readyz" if "--ready" in argv else "/healthz"
    host = os.environ.get("SERVICE_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("SERVICE_PORT", "8000")
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "4"))) as response:
            print(f"{url}: {response.status} {response.read(200).decode(errors='replace')}")
            return 0
    except urllib.error.HTTPError as exc:  # e.g. 503 from /readyz while the model loads
        print(f"{url}: {exc.code} {exc.read(300).decode(errors='replace')}")
    except (OSError, ValueError) as exc:
        print(f"{url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
