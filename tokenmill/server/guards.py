"""What keeps a web page or a rebinding DNS name from using the server, and the OpenAPI document the fuzzer reads.

A server on loopback without a key is reachable by every web page the user opens: a page can POST to
127.0.0.1 directly (blocked by the JSON-only Content-Type check in `app.read_json`) or point its own host name at
127.0.0.1 (DNS rebinding), which the Host check below refuses.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenmill.server.errors import error_body


def host_name(header: str) -> str:
    """The host part of a Host header ("[::1]:8000" -> "::1", "Example.com:80" -> "example.com")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class HostCheckMiddleware:
    """Answers 400 to a request whose Host header names a host not in `allowed_hosts` ("*" allows any). A request
    without a Host header (HTTP/1.0 probes) passes: a browser always sends one."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.allow_any = "*" in allowed_hosts
        self.allowed = {h.strip().lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allow_any:
            header = dict(scope["headers"]).get(b"host")
            if header is not None and host_name(header.decode("latin-1")) not in self.allowed:
                body = error_body("the Host header names a host this server does not serve (see --allowed-hosts)",
                                  "invalid_request_error", code="invalid_host")
                await JSONResponse(body, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def request_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body itself: the body's schema, by reference."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install_openapi(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Serve /openapi.json with the request models' schemas (routes take raw requests, so FastAPI cannot see them)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version="1", routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document() -> JSONResponse:
        return JSONResponse(json.loads(json.dumps(openapi())))
