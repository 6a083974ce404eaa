"""A small assessment backend for the demo and for trying the gateway by hand.

``python -m gateway.demo_upstream --port 8000``
"""

from __future__ import annotations

import argparse
import hashlib

import orjson
from aiohttp import web

__all__ = ["create_demo_upstream"]


async def assess(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        document = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return web.json_response({"error": "the body must be JSON"}, status=400)
    digest = hashlib.sha256(body).hexdigest()
    answer = {
        "assessment_id": "asm_" + digest[:16],
        "score": int(digest[:4], 16) % 101,
        "fields": sorted(document) if isinstance(document, dict) else [],
        "team": request.headers.get("X-Gateway-Team-Id"),
        "environment": request.headers.get("X-Gateway-Environment"),
    }
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_demo_upstream() -> web.Application:
    app = web.Application()
    app.router.add_post("/api/v1/assess", assess)
    # The public route of config/gateway.yaml and of the demo (auth: false).
    app.router.add_get("/api/v1/health", healthz)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="demo assessment upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    web.run_app(create_demo_upstream(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
