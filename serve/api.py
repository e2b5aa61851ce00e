"""The HTTP API (FastAPI), as DESIGN.md states it.

Every route but /healthz needs `Authorization: Bearer KEY`; a key reads (and with ":rw" writes)
the knowledge bases it is granted. Errors are JSON `{"error": {"code", "message", "request_id"}}`
without internals; every response carries `X-Request-ID` (the client's, when well formed). Request
bodies are limited while they are read (serve.max_upload_mb for uploads, 8 MiB for JSON), whatever
the transfer encoding.

The routes live in `serve.routes` (one router per area); this module builds the app: its state,
middleware, and the exception handlers that turn each error class into its HTTP status.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kb.errors import KBError
from kb.settings import ConfigError, Settings
from kb.writelock import WriteLockTimeout
from retrieval.knowledge_base import NoSuchKB
from serve.auth import NO_KEYS, KeyRing
from serve.middleware import (
    BodyLimitMiddleware,
    BodyStats,
    RequestIdFilter,
    RequestIdMiddleware,
    Scope,
    error_body,
    install_log_context,
    internal_error_body,
)
from serve.routes import ROUTERS
from serve.routes.common import ApiError, key_user
from serve.service import Service

__all__ = ["MAX_JSON_BODY", "ApiError", "create_app", "key_user", "log_config", "serve"]

log = logging.getLogger(__name__)
MULTIPART_SLACK = 1 << 16  # boundaries and part headers on top of the file bytes
MAX_JSON_BODY = 8 << 20
"""The largest body of a JSON route (every field has its own limit as well)."""
UPLOAD_PATH = re.compile(r"/v1/kbs/[^/]+/documents/?$")

HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


@dataclass(frozen=True)
class Limits:
    """The largest request body: an upload's, and every other route's."""

    upload: int
    json: int = MAX_JSON_BODY

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """serve.max_upload_mb and the multipart framing for uploads; MAX_JSON_BODY for the rest."""
        return cls(int(settings.serve.max_upload_mb * 2**20) + MULTIPART_SLACK)

    def for_scope(self, scope: Scope) -> int:
        """The limit of the request `scope` describes."""
        upload = scope.get("method") in ("POST", "PUT") and UPLOAD_PATH.search(scope.get("path", ""))
        return self.upload if upload else self.json


def create_app(settings: Settings, service: Service | None = None, keys: KeyRing | None = None) -> FastAPI:
    """The API app: its state (settings, service, keys, limits), middleware, error handlers and routers."""
    keys = keys if keys is not None else KeyRing.from_settings(settings)
    if not len(keys):
        raise ConfigError(NO_KEYS)
    install_log_context()
    app = FastAPI(title="Knowledge-base API", version="1.0",
                  description="Grounded, compliant answers from a company's own documents.")
    app.state.settings = settings
    app.state.service = service or Service(settings)
    app.state.keys = keys
    app.state.limits = Limits.from_settings(settings)
    app.state.body_stats = BodyStats()
    if settings.serve.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.serve.cors_origins,
                           allow_methods=["*"], allow_headers=["*"], expose_headers=["X-Request-ID"])
    # the last added runs first: request id, then the body limit, then CORS and the routes
    app.add_middleware(BodyLimitMiddleware, limit_for=app.state.limits.for_scope, stats=app.state.body_stats)
    app.add_middleware(RequestIdMiddleware)
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Map each error class to its HTTP status and JSON error body, once for every route."""
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(KBError, known_error)
    app.add_exception_handler(NoSuchKB, no_such_kb)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(WriteLockTimeout, busy)
    app.add_exception_handler(Exception, internal_error)


async def api_error(_: Request, e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(error_body(e.code, e.message), status_code=e.status, headers=headers)


async def known_error(_: Request, e: KBError) -> JSONResponse:
    """A caller's error (kb.errors.KBError): its class's status and code, its own message."""
    if e.status >= 500:
        log.warning("%s: %s", type(e).__name__, e)
    return JSONResponse(error_body(e.code, e.public_message), status_code=e.status)


async def no_such_kb(request: Request, e: NoSuchKB) -> JSONResponse:
    """404 naming the KB of the path (or the one the route checked), never its folder."""
    kb = request.path_params.get("kb") or getattr(request.state, "kb", "")
    return JSONResponse(error_body("not_found", f"no knowledge base {kb!r}"), status_code=404)


def validation_details(errs: list[dict]) -> list[dict]:
    """Each validation problem's location and message, bounded: never the input itself."""
    return [{"loc": [str(p)[:64] for p in list(x.get("loc", ()))[:8]], "msg": str(x.get("msg", ""))[:200]}
            for x in errs[:10]]


async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
    errs = validation_details(e.errors())
    msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs) or "invalid request"
    return JSONResponse(error_body("invalid_request", msg, details=errs), status_code=422)


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods of every route whose path matches the request's. The routers' own routes are
    matched (they are included without a prefix): FastAPI may keep an included router as one route."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in [*app.router.routes, *(r for router in ROUTERS for r in router.routes)]:
        if route.matches(scope)[0] is Match.PARTIAL:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method, unparsable body) in the API's error body."""
    code = HTTP_CODES.get(e.status_code, f"http_{e.status_code}")
    headers = dict(e.headers or {})
    if e.status_code == 405:  # every method of the path, not only those of the first route that matched it
        headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
    return JSONResponse(error_body(code, str(e.detail)[:300]), status_code=e.status_code, headers=headers)


async def busy(request: Request, e: WriteLockTimeout) -> JSONResponse:
    """503 with Retry-After while another writer holds the KB (no lock-file path in the body)."""
    log.warning("write lock busy: %s", e)
    kb = request.path_params.get("kb", "")
    return JSONResponse(error_body("busy", f"knowledge base {kb!r} is being written by another process; "
                                           "try again later"), status_code=503, headers={"Retry-After": "30"})


async def internal_error(_: Request, e: Exception) -> JSONResponse:
    """A backstop: RequestIdMiddleware answers first."""
    log.exception("internal error")
    return JSONResponse(internal_error_body(), status_code=500)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the API with uvicorn (blocking)."""
    import uvicorn

    app = create_app(settings)
    uvicorn.run(app, host=host or settings.serve.host, port=port or settings.serve.port, log_level="info",
                log_config=log_config())


def log_config() -> dict:
    """uvicorn's logging configuration with the request id in every line, and the application's
    warnings and errors (with their request id) on the same console."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["filters"] = {"request_id": {"()": RequestIdFilter}}
    for handler in cfg["handlers"].values():
        handler["filters"] = ["request_id"]
    cfg["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(name)s: %(message)s"
    cfg["formatters"]["access"]["fmt"] = ('%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" '
                                          "%(status_code)s")
    cfg["loggers"][""] = {"handlers": ["default"], "level": "WARNING"}
    return cfg
